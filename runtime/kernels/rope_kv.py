"""Rotary embedding of q and k and the KV-cache store, in one Triton kernel.

Input is the output of the fused q|k|v projection, [T, (Hq + 2 * Hkv) * D]. One program per
(token, block of heads) over Hq query heads then Hkv KV heads: a query head's rotated values
go into the new q, a KV head's rotated k and the v head beside it into the paged caches at
the token's slot. Replaces about fourteen torch ops per layer.

Hugging Face's rotate-half layout, with torch's rounding points in half precision:

    out = round(round(x * cos) + round(rotate_half(x) * sin)),
    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

Products of two half-precision values are exact in fp32, so each rounding equals torch's;
the products are explicitly rounded multiplies (mul.rn), which the compiler cannot fuse
with the add into an FMA, so fp32 matches torch's separate ops too.

CUDA graphs: the grid depends only on T and the head counts; slots are read on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from runtime.kernels._common import INTERPRETED, check_dtype, check_kv_dtype, check_placement, manual_bf16, round_to


@triton.jit
def _rope_store_kv_kernel(
    QKV, Cos, Sin, KCache, VCache, Slots, Q,
    stride_qkv, stride_cos, stride_sin,  # row strides; the last dims are contiguous
    stride_slot,  # out_slots may be a strided view (e.g. one row of a [steps, T] table)
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_qt, stride_qh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_D: tl.constexpr,
    LIBDEVICE: tl.constexpr,  # False under the interpreter, which has no libdevice
    MANUAL_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    # Heads [0, Hq) are query heads, [Hq, Hq + Hkv) KV heads; a program may hold both kinds.
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    half = HEAD_DIM // 2
    first = offs < half
    mask = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None] & (offs < HEAD_DIM)[None, :]
    dtype = Q.dtype.element_ty
    row = QKV + t * stride_qkv
    cols = heads[:, None] * HEAD_DIM  # q heads, then k heads: column h * D
    x = tl.load(row + cols + offs[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
    # rotate_half: element d is -x[d + D/2] in the first half, x[d - D/2] in the second.
    rot = tl.where(first, offs + half, offs - half)
    x_rot = tl.load(row + cols + rot[None, :], mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.where(first[None, :], -x_rot, x_rot)
    cos = tl.load(Cos + t * stride_cos + offs, mask=offs < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * stride_sin + offs, mask=offs < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
    if LIBDEVICE:
        # mul.rn: ptxas would otherwise fuse a product with the add below into an FMA
        # (after LLVM narrows the bf16/fp16 round trips), skipping torch's rounding of it.
        a = libdevice.mul_rn(x, cos)
        b = libdevice.mul_rn(x_rot, sin)
    else:
        a = x * cos
        b = x_rot * sin
    a = round_to(a, dtype, MANUAL_BF16).to(tl.float32)
    b = round_to(b, dtype, MANUAL_BF16).to(tl.float32)
    out = round_to(a + b, dtype, MANUAL_BF16)

    is_q = (heads < NUM_HEADS)[:, None]
    tl.store(Q + t * stride_qt + heads[:, None] * stride_qh + offs[None, :], out, mask=mask & is_q)
    kv_mask = mask & ~is_q
    kvh = (heads - NUM_HEADS)[:, None]  # negative on query rows, which kv_mask leaves out
    slot = tl.load(Slots + t * stride_slot)  # int64: page * PAGE_SIZE + offset
    page = slot // PAGE_SIZE
    pos = slot % PAGE_SIZE
    # An FP8 cache rounds K and V once more here (the caches' element type is the store's).
    tl.store(KCache + page * stride_kp + pos * stride_ks + kvh * stride_kh + offs[None, :],
             out.to(KCache.dtype.element_ty), mask=kv_mask)
    v = tl.load(row + cols + NUM_KV_HEADS * HEAD_DIM + offs[None, :], mask=kv_mask)  # v head: Hkv heads on
    tl.store(VCache + page * stride_vp + pos * stride_vs + kvh * stride_vh + offs[None, :],
             v.to(VCache.dtype.element_ty), mask=kv_mask)


def _launch_config(block_d: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps). Swept on H200 (bf16; 9/3 heads D 64 and 32/8 heads D 128; T 1,
    16, 256; 1-16 heads, 1-8 warps): within ~0.3 us of the best of each case."""
    return 8, 4


def _check(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    if num_heads < 1 or num_kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_store_kv: need num_heads, num_kv_heads >= 1 and an even head_dim, got "
                         f"{num_heads}, {num_kv_heads}, {head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"rope_store_kv: qkv must be [T, (Hq + 2 * Hkv) * D = {width}], got shape {tuple(qkv.shape)}")
    check_dtype("qkv", qkv)
    t = qkv.shape[0]
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape not in ((t, head_dim), (t, 1, head_dim)):
            raise ValueError(f"rope_store_kv: {name} must be [T={t}, D={head_dim}] or [T, 1, D], got shape {tuple(c.shape)}")
        check_dtype(name, c, qkv.dtype)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[2:] != (num_kv_heads, head_dim):
            raise ValueError(f"rope_store_kv: {name} must be [num_pages, page_size, Hkv={num_kv_heads}, "
                             f"D={head_dim}], got shape {tuple(c.shape)}")
    check_kv_dtype("rope_store_kv", qkv.dtype, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"rope_store_kv: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if out_slots.shape != (t,):
        raise ValueError(f"rope_store_kv: out_slots must be [T={t}], got shape {tuple(out_slots.shape)}")
    check_dtype("out_slots", out_slots, torch.int64)
    check_placement("rope_store_kv", {"qkv": qkv, "cos": cos, "sin": sin, "k_cache": k_cache,
                                      "v_cache": v_cache, "out_slots": out_slots}, any_stride=("out_slots",))


def rope_store_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D]: q | k | v, last dim contiguous
    cos: torch.Tensor,  # [T, D] or [T, 1, D], qkv's dtype
    sin: torch.Tensor,  # [T, D] or [T, 1, D], qkv's dtype
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], any page/slot/head strides
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    out_slots: torch.Tensor,  # int64 [T], any stride: page * page_size + offset of each token
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:  # [T, Hq, D] contiguous, qkv's dtype
    """Returns rotary(q); writes rotary(k) and v into the caches at each token's slot.

    Slot values are not checked (that would sync with the GPU): each must be below
    num_pages * page_size, and two tokens must not share a slot."""
    _check(qkv, cos, sin, k_cache, v_cache, out_slots, num_heads, num_kv_heads, head_dim)
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    block_d = triton.next_power_of_2(head_dim)
    block_h, num_warps = _launch_config(block_d)
    _rope_store_kv_kernel[(t, triton.cdiv(num_heads + num_kv_heads, block_h))](
        qkv, cos, sin, k_cache, v_cache, out_slots, q,
        qkv.stride(0), cos.stride(0), sin.stride(0), out_slots.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.stride(0), q.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
        LIBDEVICE=not INTERPRETED, MANUAL_BF16=manual_bf16(qkv.dtype),
        num_warps=num_warps,
    )
    return q
