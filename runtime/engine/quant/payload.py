"""A projection's weight as read from a checkpoint, before it becomes a layer: a dense
tensor [N, K], or already-quantized values (`QWeight`: an FP8 checkpoint's e4m3 weight, a
GGUF's blocks). Fused projections concatenate their parts' payloads along N, so an FP8
or Q4 checkpoint keeps its own values through the q|k|v and gate|up fusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.engine.quant.base import QuantLinear
from runtime.engine.quant.fp8 import Fp8Linear, quantize_fp8
from runtime.engine.quant.int4 import Int4Linear, pick_group_size, quantize_int4
from runtime.engine.quant.int8 import Int8Linear, quantize_int8


@dataclass
class QWeight:
    """kind "fp8": (q e4m3 [N, K], scale fp32 [N]); "int8": (q int8 [N, K], scale [N]);
    "int4": (q int32 [N, K] in 0..15, scale [N, K/G], zero [N, K/G]), w = (q - 8) s + z;
    "q8_0": (q int8 [N, K], scale [N, K/32]), a GGUF Q8_0 tensor."""

    kind: str
    tensors: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tensors[0].shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        q = self.tensors[0].float()
        if self.kind in ("fp8", "int8"):
            return q * self.tensors[1].float()[:, None]
        if self.kind == "int4":
            s, z = self.tensors[1].float(), self.tensors[2].float()
            g = q.shape[1] // s.shape[1]
            return ((q - 8).view(q.shape[0], -1, g) * s[..., None] + z[..., None]).view(q.shape)
        if self.kind == "q8_0":
            s = self.tensors[1].float()
            return (q.view(q.shape[0], s.shape[1], -1) * s[..., None]).view(q.shape)
        raise ValueError(f"unknown quantized weight kind {self.kind!r}")


Payload = torch.Tensor | QWeight


def fuse_payloads(parts: list[Payload]) -> Payload:
    """The payload of the concatenated projection. Parts of one kind (and group width)
    concatenate as they are; mixed parts (a GGUF with Q4_1 q/k and Q8_0 v) fall back to dense fp32."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, QWeight) and all(isinstance(p, QWeight) and p.kind == first.kind for p in parts):
        widths = {tuple(t.shape[1:] for t in p.tensors) for p in parts}  # type: ignore[union-attr]
        if len(widths) == 1:
            return QWeight(first.kind, tuple(torch.cat(ts) for ts in zip(*(p.tensors for p in parts))))  # type: ignore[union-attr]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    return torch.cat([as_dense(p) for p in parts])


def as_dense(p: Payload) -> torch.Tensor:
    return p.dequantize() if isinstance(p, QWeight) else p


def requantize_q8_0_per_channel(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 (int8 values, one scale per 32) -> int8 with one scale per row, the layout
    `_weight_int8pack_mm` takes. Row scale = the row's largest block scale, so the block
    with it keeps its values exactly; the others are rounded to the coarser step (an error
    of at most half a row step per value)."""
    n, k = q.shape
    row = scale.float().amax(dim=1).clamp(min=1e-12)  # [N]
    w = q.float().view(n, scale.shape[1], -1) * (scale.float() / row[:, None])[..., None]
    return torch.round(w.view(n, k)).clamp(-127, 127).to(torch.int8), row


def build_linear(p: Payload, bias: torch.Tensor | None, scheme: str, dtype: torch.dtype,
                 group_size: int | None = None, dense_prefill: bool = False) -> nn.Module:
    """The layer serving payload `p` under `scheme` ("none" | "fp8" | "int8" | "int4").
    A payload already in the scheme's layout is used as it is; anything else is dequantized
    to fp32 and quantized (say where: README, Quantization). dense_prefill (int8/int4): the
    layer also keeps its quantized values dense in `dtype`, for prefill-sized inputs."""
    if scheme == "none":
        w = as_dense(p).to(dtype)
        out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        out.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return out
    bias = None if bias is None else bias.to(dtype)
    kind = p.kind if isinstance(p, QWeight) else "dense"
    if scheme == "fp8":
        q, s = p.tensors if kind == "fp8" else quantize_fp8(as_dense(p))  # type: ignore[union-attr]
        return Fp8Linear(q, s, bias)
    if scheme == "int8":
        if kind == "int8":
            q, s = p.tensors  # type: ignore[union-attr]
        elif kind == "q8_0":
            q, s = requantize_q8_0_per_channel(*p.tensors)  # type: ignore[union-attr]
        else:
            q, s = quantize_int8(as_dense(p))
        layer = Int8Linear(q, s, bias, dtype)
        if dense_prefill:  # the values the packed op multiplies by (its scales in `dtype`)
            layer.keep_dense(dtype, q.float() * s.to(dtype).float()[:, None])
        return layer
    if scheme == "int4":
        if kind == "int4" and (group_size is None or p.shape[1] // p.tensors[1].shape[1] == group_size):  # type: ignore[union-attr]
            q, s, z = p.tensors  # type: ignore[union-attr]
        else:
            w = as_dense(p)
            q, s, z = quantize_int4(w, pick_group_size(w.shape[1], group_size))
        layer = Int4Linear(q, s, z, bias, dtype)
        if dense_prefill:  # the values the packed op multiplies by (scales and zeros in `dtype`)
            n, k = q.shape
            g = q.float().view(n, s.shape[1], -1) - 8.0
            layer.keep_dense(dtype, (g * s.to(dtype).float()[..., None] + z.to(dtype).float()[..., None]).view(n, k))
        return layer
    raise ValueError(f"unknown quantization {scheme!r}")


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)
