"""SiLU(gate) * up over the fused gate|up projection, in one Triton kernel.

Torch's rounding points: F.silu computes gate / (1 + exp(-gate)) in fp32 and rounds to the
dtype, then the multiply by up rounds again. On a GPU the kernel uses libdevice's expf and
an IEEE division, the functions torch's CUDA kernel compiles to; Triton's interpreter has
no libdevice and uses numpy's exp, whose last fp32 bit can differ from torch's CPU exp, so
there a half-precision output can, rarely, be one ulp off.

CUDA graphs: the grid depends only on the shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from runtime.kernels._common import INTERPRETED, check_dtype, check_placement, manual_bf16, round_to

# Swept on H200 (bf16, I 1536 and 14336, T 1-256, blocks 256-4096, 1-8 warps).
_BLOCK, _NUM_WARPS = 512, 4


@triton.jit
def silu_times(gate, up, dtype: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """silu(gate) * up in `dtype` from fp32 gate and up, rounded where torch rounds (also
    kernels/gemv.py's prologue for the down projection)."""
    if LIBDEVICE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    silu = round_to(tl.div_rn(gate, 1.0 + e), dtype, MANUAL_BF16).to(tl.float32)
    return round_to(silu * up, dtype, MANUAL_BF16)


@triton.jit
def _silu_and_mul_kernel(
    GateUp, Out,
    stride_in, stride_out,  # row strides; the last dims are contiguous
    inter,  # I: gate is columns [0, I), up [I, 2I)
    BLOCK: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr,  # False under the interpreter, which has no libdevice
    MANUAL_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dtype = Out.dtype.element_ty
    row = GateUp + t * stride_in
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_out + offs, silu_times(gate, up, dtype, LIBDEVICE_EXP, MANUAL_BF16), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I] contiguous
    """F.silu(gate) * up with gate, up = gate_up.chunk(2, -1)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_and_mul: gate_up must be [T, 2 * I], got shape {tuple(gate_up.shape)}")
    check_dtype("gate_up", gate_up)
    check_placement("silu_and_mul", {"gate_up": gate_up})
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](
        gate_up, out,
        gate_up.stride(0), out.stride(0),
        inter,
        BLOCK=block, LIBDEVICE_EXP=not INTERPRETED, MANUAL_BF16=manual_bf16(gate_up.dtype),
        num_warps=_NUM_WARPS,
    )
    return out
