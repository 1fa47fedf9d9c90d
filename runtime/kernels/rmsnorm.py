"""RMSNorm, optionally fused with the residual add, in one Triton kernel: one program per row.

Bit-faithful to the torch recipe of `runtime.engine.model.RMSNorm` (the same rounding
points, in the same order):

    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

With `residual` it works in place like flashinfer's fused_add_rmsnorm: s = x + residual
rounded to x's dtype, residual <- s, x <- rmsnorm(s). Not bit-identical: the fp32 sum of
squares runs in another order than torch's (and on a GPU both take an approximate rsqrt),
which can move the fp32 normalised value by a few ulps. In half precision that rarely
changes its rounding (H200, bf16, 256 x 4096: 14 elements of 1M, by one ulp; after the
weight multiply at most two ulps of the output); fp32 outputs differ by up to ~4 ulps.

CUDA graphs: the grid depends only on shapes and the wrapper never reads tensor values on
the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import check_dtype, check_placement, manual_bf16, round_to

_MAX_HIDDEN = 16384  # one row lives in registers: 32 fp32 values per thread at 16 warps


@triton.jit
def _rmsnorm_kernel(
    X, Residual, W, Y,
    eps,
    stride_x, stride_r, stride_y,  # row strides; the last dims are contiguous
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,  # HIDDEN rounded up to a power of two
    HAS_RESIDUAL: tl.constexpr,  # X <- rmsnorm(X + Residual), Residual <- X + Residual
    MANUAL_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    dtype = Y.dtype.element_ty
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(x + r, dtype, MANUAL_BF16)  # the add rounds to x's dtype, as in torch
        tl.store(Residual + row * stride_r + offs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    normed = round_to(x * rstd, dtype, MANUAL_BF16).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, round_to(w * normed, dtype, MANUAL_BF16), mask=mask)


def _num_warps(block: int) -> int:
    """Swept on H200 (bf16, H 576 and 4096, T 1-256): 1-4 warps alike at H 576, 8-16 best at 4096."""
    return min(max(block // 512, 1), 16)


def rmsnorm(
    x: torch.Tensor,  # [T, H], last dim contiguous
    weight: torch.Tensor,  # [H], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H], x's dtype, last dim contiguous
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(x) as a new [T, H] tensor; with `residual`, in place: residual <- x + residual,
    x <- rmsnorm(x + residual), and returns (x, residual)."""
    if x.dim() != 2:
        raise ValueError(f"rmsnorm: x must be [T, H], got shape {tuple(x.shape)}")
    check_dtype("x", x)
    t, h = x.shape
    if weight.shape != (h,):
        raise ValueError(f"rmsnorm: weight must be [H={h}], got shape {tuple(weight.shape)}")
    check_dtype("weight", weight, x.dtype)
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        check_dtype("residual", residual, x.dtype)
        if residual.numel() and residual.data_ptr() == x.data_ptr():
            raise ValueError("rmsnorm: residual and x must be different tensors (both are written)")
        tensors["residual"] = residual
    check_placement("rmsnorm", tensors)
    if not 0 < h <= _MAX_HIDDEN:
        raise ValueError(f"rmsnorm: hidden size must be in [1, {_MAX_HIDDEN}], got {h}")

    y = x if residual is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if t:
        block = triton.next_power_of_2(h)
        _rmsnorm_kernel[(t,)](
            x, residual if residual is not None else x, weight, y,
            float(eps),
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            HIDDEN=h, BLOCK=block, HAS_RESIDUAL=residual is not None,
            MANUAL_BF16=manual_bf16(x.dtype),
            num_warps=_num_warps(block),
        )
    return (x, residual) if residual is not None else y
