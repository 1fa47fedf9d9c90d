"""CPU weight-only int8: symmetric per-output-channel scales, activations in the model's
dtype (bf16 or fp32), through `torch.ops.aten._weight_int8pack_mm`.

The op takes the int8 weight row-major [N, K] and one scale per output channel [N] in
the activation dtype: y = x @ (q * s[:, None]).T. It has no group scales, so a GGUF
Q8_0 tensor (a scale per 32 values) is re-quantized per channel (see quant/gguf.py).
"""
from __future__ import annotations

import torch

from runtime.engine.quant.base import QuantLinear

_INT8_MM = torch._weight_int8pack_mm  # the C++ binding itself: no Python frame per call


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale fp32 [N]) with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(QuantLinear):
    scheme = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """q int8 [N, K], scale [N] (any float dtype; stored in `dtype`, the activations')."""
        n, k = q.shape
        if q.dtype != torch.int8 or scale.shape != (n,):
            raise ValueError(f"Int8Linear: want int8 [N, K] and scale [N], got {q.dtype} {tuple(q.shape)}, "
                             f"{tuple(scale.shape)}")
        super().__init__(k, n, bias)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        q, scale = quantize_int8(w)
        return cls(q, scale, bias, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale.float()[:, None]).to(dtype)

    def decode_op(self, dtype: torch.dtype):
        if self.bias is not None or self.scale.dtype != dtype:
            return None
        return _INT8_MM, (self.weight, self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _INT8_MM(x, self.weight, self.scale.to(x.dtype))
