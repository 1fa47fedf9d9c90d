"""FP8 (e4m3) weights with one fp32 scale per output channel and dynamic per-token
activation scales: y = (xq * sx) @ (wq * sw).T.

On CUDA, inputs of at most 16 rows (decode; up to 64 where kernels/configs holds a
measurement for the GPU that says so) run runtime/kernels/gemv.py's weight-only FP8
product: the e4m3 weight widened in registers and multiplied by x itself (not quantized),
one launch reading the weight's bytes once. `torch._scaled_mm` at 1-64 rows lost to bf16 on the
H200 (8B shape, batch-1 step 6.8 ms against 4.5 ms in bf16, mostly the eight torch launches
that quantized each activation). Wider inputs run `torch._scaled_mm` with row-wise scales:
the activation rows are quantized per token on the device in one launch
(runtime/kernels/fp8_quant.py; no host sync, so this runs inside the decode CUDA graphs;
padded rows are zeros and stay zeros), scale_a fp32 [M, 1],
scale_b fp32 [1, N], the weight passed column-major as wq.t() of the row-major [N, K]
buffer, out_dtype bf16. `_scaled_mm` needs K and N to be multiples of 16 and places no
constraint on M. Elsewhere (CPU, or a shape it refuses) the same math runs as the
reference: both operands dequantized, then one fp32 matmul.
"""
from __future__ import annotations

import logging
import os

import torch

from runtime.engine.quant.base import QuantLinear

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_MIN_SCALE = 1e-12  # an all-zero row (a padded row) gets this scale: its values stay 0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q e4m3 [N, K], scale fp32 [N]) with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (q e4m3 [M, K], scale fp32 [M, 1]): one scale per token."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) * (1.0 / FP8_MAX)).clamp(min=_MIN_SCALE)  # as fp8_quant.py
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def checkpoint_fp8_weight(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 checkpoint's weight (e4m3 [N, K]) and its `weight_scale` (per tensor: [] or
    [1]; per channel: [N] or [N, 1]) or block `weight_scale_inv` ([ceil(N/bn), ceil(K/bk)],
    DeepSeek-style, a multiplier despite the name) -> (q, per-channel fp32 [N]).
    Per-tensor and per-channel scales are kept exactly; block scales are dequantized and
    re-quantized per channel (the one lossy case)."""
    n, k = q.shape
    s = scale.float()
    if s.numel() == 1:
        return q, s.reshape(1).expand(n).contiguous()
    if s.numel() == n and (s.dim() == 1 or s.shape[-1] == 1):
        return q, s.reshape(n).contiguous()
    if s.dim() == 2:
        bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
        full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return quantize_fp8(q.float() * full)
    raise ValueError(f"fp8 weight [{n}, {k}]: cannot read a scale of shape {tuple(s.shape)}")


def scaled_mm_serves(device: torch.device, n: int, k: int) -> bool:
    """Whether `torch._scaled_mm` runs this shape on this device (CUDA, K and N % 16)."""
    return device.type == "cuda" and n % 16 == 0 and k % 16 == 0 and hasattr(torch, "_scaled_mm")


class _Kernels:
    """runtime/kernels' FP8 pieces, imported once on first use (None without Triton)."""

    def __init__(self) -> None:
        from runtime.kernels.fp8_quant import quantize_rows
        from runtime.kernels.gemv import gemv
        from runtime.kernels.gemv_configs import fp8_max_rows, fp8_uses_gemv

        # Per shape and row count, the measured table (bench_gemv_fp8.py, kernels/configs)
        # says whether the weight-only gemv or _scaled_mm serves; where it does not say, the
        # gemv serves up to gemv_rows rows and _scaled_mm more.
        self.gemv, self.gemv_rows, self.quantize_rows = gemv, fp8_max_rows(), quantize_rows
        self.uses_gemv = fp8_uses_gemv
        self.gemv_ok = True  # False after the gemv failed once (then _scaled_mm serves every shape)


_KERNELS: list[_Kernels | None] = []


def _kernels_for(x: torch.Tensor) -> _Kernels | None:
    """The Triton kernels for x: on CUDA, or anywhere under Triton's interpreter (its tests)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    if not _KERNELS:
        try:
            _KERNELS.append(_Kernels())
        except Exception:  # no Triton: torch ops only
            _KERNELS.append(None)
    return _KERNELS[0]


class Fp8Linear(QuantLinear):
    scheme = "fp8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """q e4m3 [N, K] row-major, scale fp32 [N]."""
        n, k = q.shape
        if q.dtype != FP8 or scale.shape != (n,):
            raise ValueError(f"Fp8Linear: want e4m3 [N, K] and scale [N], got {q.dtype} {tuple(q.shape)}, "
                             f"{tuple(scale.shape)}")
        super().__init__(k, n, bias)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.float().reshape(1, n).contiguous())  # [1, N]: scale_b as is
        self.use_scaled_mm = scaled_mm_serves(q.device, n, k)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None) -> "Fp8Linear":
        q, scale = quantize_fp8(w)
        return cls(q, scale, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale.t()).to(dtype)

    def gemv_args(self, x: torch.Tensor) -> dict | None:
        """The weight-only gemv's arguments where it serves x (at most the measured rows, half
        precision), for callers that fuse work into that launch (kernel_dispatch.gemv_args); else None."""
        kernels = _kernels_for(x)
        if (not self.use_scaled_mm or kernels is None or not kernels.gemv_ok
                or x.dtype not in (torch.bfloat16, torch.float16)):
            return None
        rows = x.shape[0]
        measured = kernels.uses_gemv(rows, self.out_features, self.in_features, x.device)
        if measured is False or (measured is None and rows > kernels.gemv_rows):
            return None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dict(weight=self.weight, bias=bias, scale=self.scale.view(-1), config=None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_scaled_mm:
            return self.reference(x)
        kernels = _kernels_for(x)
        if self.gemv_args(x) is not None:
            try:
                return kernels.gemv(x, self.weight, scale=self.scale.view(-1))
            except Exception as e:  # e.g. no e4m3 in this GPU's Triton: compile errors come at the first (eager) call
                kernels.gemv_ok = False
                log.warning("FP8 weight-only gemv failed on %s (%s: %s); FP8 projections use torch._scaled_mm",
                            x.device, type(e).__name__, e)
        return self.scaled_mm(x)

    def scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA path (also runs on CPU where torch implements `_scaled_mm` there)."""
        kernels = _kernels_for(x)
        xq, sx = kernels.quantize_rows(x) if kernels is not None else quantize_rows_fp8(x)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale, out_dtype=torch.bfloat16)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows_fp8(x)
        return ((xq.float() * sx) @ self.dequantize(torch.float32).t()).to(x.dtype)
