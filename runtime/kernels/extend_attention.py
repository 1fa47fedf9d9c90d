"""Paged attention for ragged batches ("extend"): prefill, chunked prefill and mixed batches.

The new tokens of B sequences are packed one after another: q [T, Hq, D] with `cu_q_lens`.
Sequence b has kv_len[b] keys in the paged cache once its new tokens are written (its
cached prefix and its new tokens alike, both read through the page table), and its new
token j sits at position kv_len[b] - q_len[b] + j, seeing every key up to its own (causal).

FlashAttention-2 tiling with an online softmax, in base 2. One program per (query block,
KV head): a block holds BLOCK_M rows, each one (token, query head) pair of the GROUP query
heads that share the KV head (row r: token r // GROUP, head r % GROUP), so every key and
value a block reads serves all its heads: K/V traffic is 1/GROUP of a per-head grid.
The key loop runs in two parts: blocks every row may see whole (the cached prefix and the
keys before the block's first token) without any mask, then the few blocks near the
diagonal with the causal (and tree) mask. No padding of the batch, no materialised mask.

The host hands in the list of query blocks (sequence, first token) so that a batch of one
long prompt and many one-token rows launches no empty programs; the wrapper launches
short sequences with 16-row blocks and long ones with big blocks.

An optional tree rule per sequence (tree_start, tree_bits), as in paged_decode: a key at
position p >= tree_start is seen only when bit (p - tree_start) of tree_bits is set.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import INTERPRETED, check_kv_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
SMALL_BLOCK_M = 16  # rows of a block for short sequences (the minimum tl.dot M)


@triton.jit
def _attend(acc, m_i, l_i, q, K, V, pt_row, n0, end, pos, kvh, t_start, t_bits,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            offs_n, offs_d, d_mask, qk_scale, PAGE_SIZE: tl.constexpr,
            MASKED: tl.constexpr, HAS_TREE: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """One block of BLOCK_N keys from n0 folded into the online softmax (acc, m_i, l_i).
    MASKED: apply the causal rule (keys up to each row's position), key validity and the
    tree rule; unmasked blocks are wholly visible to every row."""
    kp = n0 + offs_n
    if MASKED:
        n_ok = kp < end
        page = tl.load(pt_row + kp // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_mask = n_ok[:, None] & d_mask[None, :]
    else:
        page = tl.load(pt_row + kp // PAGE_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    slot = kp % PAGE_SIZE
    k = tl.load(K + page[:, None] * stride_kp + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:  # an FP8 cache is widened to q's dtype (a no-op for a cache of q's dtype)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        seen = (kp[None, :] <= pos[:, None]) & n_ok[None, :]
        if HAS_TREE:
            rel = kp - t_start
            bit = (t_bits >> tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)) & 1
            seen = seen & ((rel < 0) | ((rel < 64) & (bit == 1)))[None, :]
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row can see no key of this block (padding rows, tree rows): keep exp2 finite.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# Ints that change from step to step are not specialised on (Triton compiles a variant per
# value class: == 1, divisible by 16, other): each new variant was a compile stall of a
# second or more in the middle of serving.
@triton.jit(do_not_specialize=["num_blocks", "stride_ptb"])
def _extend_kernel(
    Q, K, V, Out, PageTable, CuQ, KvLens, TreeStart, TreeBits, Blocks,
    qk_scale,  # softmax scale * log2(e)
    num_blocks,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_ptb,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows (token, head) per block
    BLOCK_T: tl.constexpr,  # tokens per block: BLOCK_M // GROUP
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per loop step
    HAS_TREE: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns as ints
):
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(Blocks + blk)
    t0 = tl.load(Blocks + num_blocks + blk)  # first token of the block, within its sequence
    q_begin = tl.load(CuQ + seq)
    q_len = tl.load(CuQ + seq + 1) - q_begin
    kv_len = tl.load(KvLens + seq)
    ctx = kv_len - q_len  # keys before the first new token

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = t0 + offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_T * GROUP) & (tok < q_len)
    d_mask = offs_d < HEAD_DIM
    pos = ctx + tok  # each row's own key position
    tok64 = (q_begin + tok).to(tl.int64)

    q = tl.load(
        Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pt_row = PageTable + seq.to(tl.int64) * stride_ptb

    # Keys every row of the block sees: up to the block's first token (and the tree start).
    last_tok = tl.minimum(t0 + BLOCK_T, q_len) - 1
    full_end = ctx + t0 + 1
    t_start = kv_len
    t_bits = tl.zeros([], dtype=tl.int64)
    if HAS_TREE:
        t_start = tl.load(TreeStart + seq)
        t_bits = tl.load(TreeBits + seq)
        full_end = tl.minimum(full_end, t_start)
    full_end = (full_end // BLOCK_N) * BLOCK_N
    end = ctx + last_tok + 1

    for n0 in range(0, full_end, BLOCK_N):  # no mask: every row sees these keys
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, pt_row, n0, end, pos, kvh, t_start, t_bits,
                                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                offs_n, offs_d, d_mask, qk_scale, PAGE_SIZE, False, False, IEEE_DOT, UPCAST)
    for n0 in range(full_end, end, BLOCK_N):  # near the diagonal: causal (and tree) mask
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, pt_row, n0, end, pos, kvh, t_start, t_bits,
                                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                offs_n, offs_d, d_mask, qk_scale, PAGE_SIZE, True, HAS_TREE, IEEE_DOT, UPCAST)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )


def launch_config(head_dim: int, group: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the big-block launch."""
    if INTERPRETED:
        return 32, 16, 4, 1  # the interpreter: small tiles, fast tests
    if dtype == torch.float32:
        return 64, 32, 4, 2  # fp32 tiles are twice the bytes; ieee dots are slow anyway
    block_d = triton.next_power_of_2(head_dim)
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        # Swept on the H200 (Llama-3-8B heads, bf16, 5 serving shapes x 9 configs): within 8%
        # of the best config on each shape; (128, 64, 8, 3) was 25% off on 32 prompts of 512.
        return 128, 32, 4, 3
    return 64, 32, 4, 2


def small_block_m(group: int) -> int:
    """Rows of a block for short sequences: 16, or the group if it is larger."""
    return max(SMALL_BLOCK_M, triton.next_power_of_2(group))


class ExtendPlan:
    """The host-side half of a launch: which (sequence, first token) blocks each of the two
    launches (short sequences in small blocks, long ones in big blocks) runs. Built once
    per forward from host lists, then reused by every layer."""

    def __init__(self, q_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 config: tuple[int, int, int, int] | None = None) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV heads")
        self.group = group = num_q_heads // num_kv_heads
        self.config = config or launch_config(head_dim, group, dtype)
        big_m = max(self.config[0], triton.next_power_of_2(group))
        small_m = small_block_m(group)
        self.small_t, self.big_t = small_m // group, big_m // group
        self.small_m, self.big_m = small_m, big_m
        small: tuple[list[int], list[int]] = ([], [])
        big: tuple[list[int], list[int]] = ([], [])
        for b, n in enumerate(q_lens):
            # Short sequences (decode-shape rows, short chunks) waste less in 16-row blocks.
            dst, step = (small, self.small_t) if n * group <= 4 * small_m else (big, self.big_t)
            starts = range(0, n, step)
            dst[0].extend([b] * len(starts))
            dst[1].extend(starts)
        self.small = self._upload(small, device)
        self.big = self._upload(big, device)

    @staticmethod
    def _upload(blocks: tuple[list[int], list[int]], device: torch.device) -> torch.Tensor | None:
        if not blocks[0]:
            return None
        # int32 [2 * n]: sequence ids, then first tokens. From pinned memory: a copy from
        # pageable memory makes the host wait for the stream's queued work first (with the
        # overlap schedule, the whole step before this one).
        host = torch.tensor(blocks[0] + blocks[1], dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        return host.to(device, non_blocking=True)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
           cu_q_lens: torch.Tensor, kv_lens: torch.Tensor, tree_start, tree_bits) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"extend_attention: q must be [T, Hq, D] and the caches [pages, page_size, Hkv, D] "
                         f"alike, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"extend_attention: head dims differ: q {q.shape[2]}, cache {k_cache.shape[3]}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"extend_attention: q and caches must share one of {_DTYPES}, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_kv_dtype("extend_attention", q.dtype, k_cache, v_cache)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("extend_attention: head_dim must be contiguous in q and the caches")
    for name, t in (("page_table", page_table), ("cu_q_lens", cu_q_lens), ("kv_lens", kv_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"extend_attention: {name} must be int32, got {t.dtype}")
    if page_table.dim() != 2 or page_table.stride(1) != 1:
        raise ValueError("extend_attention: page_table must be [B, max_pages], contiguous rows")
    b = page_table.shape[0]
    if cu_q_lens.shape != (b + 1,) or kv_lens.shape != (b,):
        raise ValueError(f"extend_attention: cu_q_lens must be [B+1] and kv_lens [B] for B={b}, got "
                         f"{tuple(cu_q_lens.shape)} and {tuple(kv_lens.shape)}")
    if (tree_start is None) != (tree_bits is None):
        raise ValueError("extend_attention: tree_start and tree_bits go together")
    if tree_start is not None and (tree_start.dtype != torch.int32 or tree_bits.dtype != torch.int64
                                   or tree_start.shape != (b,) or tree_bits.shape != (b,)):
        raise ValueError("extend_attention: tree_start must be int32 [B] and tree_bits int64 [B]")
    devices = {t.device for t in (q, k_cache, v_cache, page_table, cu_q_lens, kv_lens)}
    if len(devices) != 1:
        raise ValueError(f"extend_attention: all tensors must be on one device, got {devices}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError("extend_attention needs CUDA tensors (on CPU only under TRITON_INTERPRET=1)")


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], any page/slot/head strides
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    page_table: torch.Tensor,  # int32 [B, max_pages]
    cu_q_lens: torch.Tensor,  # int32 [B+1]
    kv_lens: torch.Tensor,  # int32 [B], cached + new tokens
    scale: float,
    plan: ExtendPlan,
    tree_start: torch.Tensor | None = None,  # int32 [B]
    tree_bits: torch.Tensor | None = None,  # int64 [B]
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:
    """Causal attention of the packed new queries over each sequence's paged keys. No host
    sync: every size comes from `plan` (built from host lists)."""
    if q.dim() == 3 and k_cache.dim() == 4 and q.shape[1] != plan.group * k_cache.shape[2]:
        raise ValueError(f"extend_attention: {q.shape[1]} query heads, {k_cache.shape[2]} KV heads, "
                         f"plan made for group {plan.group}")
    _check(q, k_cache, v_cache, page_table, cu_q_lens, kv_lens, tree_start, tree_bits)
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    has_tree = tree_start is not None
    ts = tree_start if has_tree else kv_lens
    tb = tree_bits if has_tree else kv_lens
    block_d = triton.next_power_of_2(d)
    ieee = q.dtype == torch.float32
    upcast = INTERPRETED and q.dtype != torch.float32
    _, block_n, warps, stages = plan.config
    for blocks, block_m, block_t, bn, w, st in (
        (plan.small, plan.small_m, plan.small_t, min(block_n, 64), 4, 2),
        (plan.big, plan.big_m, plan.big_t, block_n, warps, stages),
    ):
        if blocks is None:
            continue
        n = blocks.shape[0] // 2
        _extend_kernel[(n, hkv)](
            q, k_cache, v_cache, out, page_table, cu_q_lens, kv_lens, ts, tb, blocks,
            scale * _LOG2E, n,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            page_table.stride(0),
            GROUP=plan.group, HEAD_DIM=d, PAGE_SIZE=k_cache.shape[1],
            BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=bn,
            HAS_TREE=has_tree, IEEE_DOT=ieee, UPCAST=upcast,
            num_warps=w, num_stages=st,
        )
    return out
