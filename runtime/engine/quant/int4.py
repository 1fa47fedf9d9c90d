"""CPU weight-only int4: asymmetric groups of 32/64/128 input channels, activations in the
model's dtype, through `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`.

The op's contract, checked by experiment on torch 2.13 CPU (tests/unit/test_quant.py):
values q in 0..15 as int32 [N, K] are packed into uint8 [N, K/2] (a private layout), and
`scales_and_zeros` is [K/G, N, 2] in the activation dtype, dequantizing group g of row n as
    w = (q - 8) * scale[g, n] + zero[g, n].
GGUF Q4_1 blocks (w = d * q + m, 32 values) map onto it exactly with G = 32, scale = d,
zero = m + 8 d; Q4_0 (w = d * (q - 8)) with zero = 0 (quant/gguf.py).
"""
from __future__ import annotations

import torch

from runtime.config import INT4_GROUP_SIZES as GROUP_SIZES  # without a choice: 32 (GGUF Q4 blocks are 32 wide)
from runtime.engine.quant.base import QuantLinear

_INT4_MM = torch._weight_int4pack_mm_for_cpu  # the C++ binding itself: no Python frame per call


def pick_group_size(k: int, want: int | None = None) -> int:
    """`want` if given (it must divide K), else the smallest supported group dividing K."""
    sizes = (want,) if want else GROUP_SIZES
    for g in sizes:
        if g in GROUP_SIZES and k % g == 0:
            return g
    raise ValueError(f"int4: no group size of {sizes} divides the input width {k}")


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int32 [N, K] in 0..15, scale fp32 [N, K/G], zero fp32 [N, K/G]), the
    min/max asymmetric rounding: each group's min maps to q 0 and its max to q 15. On
    weights that are already Q4_1-dequantized this recovers the blocks."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo + 8.0 * scale


class Int4Linear(QuantLinear):
    scheme = "int4"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        """q int32 [N, K] in 0..15; scale, zero [N, K/G] with w = (q - 8) * scale + zero."""
        n, k = q.shape
        groups = scale.shape[1]
        if scale.shape != (n, groups) or zero.shape != scale.shape or k % groups:
            raise ValueError(f"Int4Linear: q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}")
        super().__init__(k, n, bias)
        self.group_size = pick_group_size(k, k // groups)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   group_size: int | None = None) -> "Int4Linear":
        q, scale, zero = quantize_int4(w, pick_group_size(w.shape[1], group_size))
        return cls(q, scale, zero, bias, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # The packed layout is torch's own: read the weight back through the op itself
        # (x = I_K gives W^T), in fp32 with fp32 scales so nothing is rounded on the way.
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.weight.device)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                         self.scales_and_zeros.float())
        return wt.t().to(dtype).contiguous()

    def decode_op(self, dtype: torch.dtype):
        if self.bias is not None or self.scales_and_zeros.dtype != dtype:
            return None
        return _INT4_MM, (self.weight, self.group_size, self.scales_and_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales_and_zeros
        if scales.dtype != x.dtype:  # built for the model's dtype: only dequantize() differs
            scales = scales.to(x.dtype)
        return _INT4_MM(x, self.weight, self.group_size, scales)
