"""Dynamic per-token FP8 (e4m3) quantization of activations in one launch (issue 17).

`quant/fp8.py`'s `quantize_rows_fp8` in torch ops is about eight kernels per projection
(widen, abs, amax, divide, clamp, divide, clamp, narrow); in a Llama-3-8B decode step that is
~1,000 small launches, which cost more than the FP8 GEMMs save. Here one program owns one
row: a first pass over the row finds amax, a second writes q = clamp(x / s, +-448) in e4m3
and s = max(amax * (1/448), 1e-12) in fp32, the same arithmetic as the torch version (one
fp32 product for s: torch on CUDA divides by a host scalar as a product by its reciprocal,
so a division here differed from it in the last bit; then an exact division and round-to-
nearest-even onto the e4m3 grid), so results are equal bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import check_placement

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INV_MAX = 1.0 / FP8_MAX  # the scale is amax times this, rounded to fp32 once, as in torch
MIN_SCALE = 1e-12
BLOCK = 1024  # columns per loop step


@triton.jit
def _round_e4m3(v):
    """fp32 v (|v| <= 448) rounded to nearest-even on the e4m3 grid, in fp32, so the cast
    that follows is exact. (Triton's interpreter casts fp32 -> e4m3 wrongly where rounding
    carries into the exponent: 124.05 became 64, not 128.) Normals keep 3 mantissa bits;
    below 2**-6 the grid is every 2**-9, rounded by adding and subtracting 1.5 * 2**14 to the
    magnitude, v's sign bit put back after: a negative value that rounds to zero is -0, as
    the torch cast gives (v + c - c gives +0: the H100 run found such codes 0x00, not 0x80;
    the sign goes back as a bit, since Triton's unary minus is 0 - x, which is +0 at 0)."""
    u = v.to(tl.uint32, bitcast=True)
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    mag = (tl.abs(v) + 24576.0) - 24576.0
    sub = (mag.to(tl.uint32, bitcast=True) | (u & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) >= 0.015625, normal, sub)


@triton.jit
def _quant_rows_kernel(X, Q, S, K, stride_x, stride_q, FP8_MAX: tl.constexpr, INV_MAX: tl.constexpr,
                       MIN_SCALE: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(X + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) * INV_MAX, MIN_SCALE)
    for k0 in range(0, K, BLOCK):
        m = k0 + cols < K
        x = tl.load(X + row * stride_x + k0 + cols, mask=m, other=0.0).to(tl.float32)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX))
        tl.store(Q + row * stride_q + k0 + cols, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (q e4m3 [M, K], scale fp32 [M, 1])."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    check_placement("quantize_rows", {"x": x, "q": q, "scale": s})
    if m and k:
        _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, INV_MAX=INV_MAX,
                                 MIN_SCALE=MIN_SCALE,
                                 BLOCK=BLOCK, num_warps=4)
    elif m:
        s.fill_(MIN_SCALE)
    return q, s
