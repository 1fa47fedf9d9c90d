"""Paged-attention decode in Triton: one query token per sequence over the paged KV cache.

Split-K ("flash-decoding"): each sequence's keys are cut into `num_splits` chunks, one
program per (sequence, KV head, chunk), so batch 1 with a long context still fills the GPU.
Each program keeps the g = Hq / Hkv query heads that share its KV head together (one
[g, D] x [D, N] product per block), so every key/value is read from memory once. A second
small kernel merges the chunks by their log-sum-exp. With one split the first kernel
normalises and writes the output itself.

CUDA graphs: the grid and the scratch buffers depend only on host ints (B, Hq, D,
num_splits), never on tensor values; each sequence divides its own kv_len into the
num_splits chunks inside the kernel. No host sync happens in `paged_decode`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from runtime.env import ENV
from runtime.kernels._common import check_kv_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# A split shorter than this many keys costs more in the merge than it gains in parallelism.
_MIN_KEYS_PER_SPLIT = 64
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["stride_ptb"])  # the page-table width changes per eager step
def _paged_decode_split_kernel(
    Q, K, V, PageTable, KvLens, TreeStart, TreeBits, MidO, MidLse, Out, Counters,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ptb,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # GROUP padded to a power of two >= 16 (the minimum dot M)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per loop step
    SINGLE_SPLIT: tl.constexpr,  # write the normalised output directly, no merge pass
    IEEE_DOT: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns as ints
    HAS_TREE: tl.constexpr,  # per-row tree rule: keys past TreeStart[b] only by bit of TreeBits[b]
    FUSED_MERGE: tl.constexpr = False,  # the last split of each (sequence, KV head) merges them
    BLOCK_S: tl.constexpr = 1,  # FUSED_MERGE: num_splits rounded up to a power of two
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h  # query heads of this program

    kv_len = tl.load(KvLens + b)
    # This sequence's chunk: its own kv_len cut into num_splits pieces of whole blocks.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    if HAS_TREE:
        t_start = tl.load(TreeStart + b)
        t_bits = tl.load(TreeBits + b)
    pt_row = PageTable + b.to(tl.int64) * stride_ptb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        page = tl.load(pt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            K + page[:, None] * stride_kp + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            V + page[:, None] * stride_vp + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:  # an FP8 cache is widened to q's dtype (a no-op for a cache of q's dtype)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_TREE:
            # A tree node sees the keys before the tree, then only its ancestors and itself.
            rel = pos - t_start
            bit = (t_bits >> tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)) & 1
            valid = n_mask & ((rel < 0) | ((rel < 64) & (bit == 1)))
        else:
            valid = n_mask
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_TREE:
            # A block can be fully masked; keep exp2's reference finite (p is then 0).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new  # every block holds at least one valid key: finite
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty chunk (or kv_len 0) has l_i == 0: its output is 0 and its lse -inf.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    hd_mask = h_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(
            Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=hd_mask,
        )
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(
            MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
            o,
            mask=hd_mask,
        )
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)
        if FUSED_MERGE:
            # Count this split done; the last one of (b, kvh) to finish merges the partials of
            # its heads (what _paged_decode_merge_kernel does, without a launch of its own).
            tl.debug_barrier()  # every thread's partial is stored before the count includes it
            count = Counters + b * tl.num_programs(1) + kvh
            finished = tl.atomic_add(count, 1, sem="acq_rel")
            if finished == num_splits - 1:
                tl.debug_barrier()
                offs_s = tl.arange(0, BLOCK_S)
                lse_all = tl.load(
                    MidLse + b * stride_mlb + heads[:, None] * stride_mlh + offs_s[None, :],
                    mask=h_mask[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"), cache_modifier=".cg",
                )  # [BLOCK_H, BLOCK_S]
                m = tl.max(lse_all, 1)
                m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights become 0
                total = tl.sum(tl.exp2(lse_all - m[:, None]), 1)
                merged = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
                for s_i in range(0, num_splits):
                    lse_s = tl.load(MidLse + b * stride_mlb + heads * stride_mlh + s_i, mask=h_mask,
                                    other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(
                        MidO + b * stride_mob + heads[:, None] * stride_moh + s_i * stride_mos + offs_d[None, :],
                        mask=hd_mask, other=0.0, cache_modifier=".cg",
                    )
                    merged += tl.exp2(lse_s - m)[:, None] * o_s
                merged = merged / tl.where(total > 0.0, total, 1.0)[:, None]
                tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         merged.to(Out.dtype.element_ty), mask=hd_mask)
                tl.atomic_xchg(count, 0)  # zero again for the next launch (CUDA graph replays)


@triton.jit
def _paged_decode_merge_kernel(
    MidO, MidLse, Out,
    num_splits,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights become 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    o = tl.load(
        MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


def _launch_config(block_d: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel. Swept on H200 (bf16; 9/3 heads
    D 64 and 32/8 heads D 128; BLOCK_N 32/64/128, 4/8 warps, 2-4 stages, 1-64 splits): with
    `default_num_splits`, this is within ~5% of the best configuration of each case."""
    return (64 if block_d <= 128 else 32), 4, 3


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter on CPU: keep the grid small
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_num_splits(
    batch_size: int, num_kv_heads: int, device: torch.device, max_kv_len: int | None = None
) -> int:
    """Chunks for up to four programs per SM, but none shorter than 64 keys.

    A pure function of host ints, so a CUDA graph captured with it can be replayed with any
    kv_lens (pass the largest max_kv_len the graph will see, or None for no cap)."""
    base = batch_size * num_kv_heads
    # Rounded down: a partial extra wave of programs costs more than it spreads (on H200,
    # 32 seqs x 8 KV heads: 2 splits 80 us, 3 splits 92 us).
    splits = max(1, _PROGRAMS_PER_SM * _sm_count(device) // max(base, 1))
    if max_kv_len is not None:
        splits = min(splits, max(1, math.ceil(max_kv_len / _MIN_KEYS_PER_SPLIT)))
    return min(splits, _MAX_SPLITS)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            "k_cache and v_cache must be [num_pages, page_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    bsz, hq, d = q.shape
    _, _, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head dim of q ({d}) and of the KV cache ({dk}) differ")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q dtype {q.dtype} not supported; use one of {_DTYPES}")
    check_kv_dtype("paged_decode", q.dtype, k_cache, v_cache)
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != bsz:
        raise ValueError(
            f"page_table must be int32 [B={bsz}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}"
        )
    if kv_lens.dtype != torch.int32 or kv_lens.shape != (bsz,):
        raise ValueError(f"kv_lens must be int32 [B={bsz}], got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "page_table": page_table, "kv_lens": kv_lens}
    if out is not None:
        tensors["out"] = out
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {({n: str(t.device) for n, t in tensors.items()})}")
    for name in ("q", "k_cache", "v_cache", "page_table", "out"):
        t = tensors.get(name)
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")
    if kv_lens.numel() and kv_lens.stride(0) != 1:
        raise ValueError("kv_lens must be contiguous")
    if q.device.type != "cuda" and not _interpreted():
        raise ValueError(
            f"paged_decode needs CUDA tensors (got {q.device}); on CPU it runs only under "
            "TRITON_INTERPRET=1, set before triton is imported"
        )


# FUSED_MERGE's split counters, one int32 per (sequence, KV head), zero between launches (the
# last split resets its own). Per device, grown by allocating anew; the old buffers stay
# alive, as CUDA graphs captured with them keep using them. Launches on one stream only: two
# decode launches running at once on different streams would share the counters.
_COUNTERS: dict[tuple[str, int | None], list[torch.Tensor]] = {}
_MIN_COUNTERS = 1 << 15  # 512 sequences x 64 KV heads


def _counters(device: torch.device, n: int) -> torch.Tensor:
    held = _COUNTERS.setdefault((device.type, device.index), [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device))
    return held[-1]


_MERGE: str | None = None  # RUNTIME_DECODE_MERGE, read at the first launch that does not name a mode


def _merge_mode(merge: str | None) -> str:
    global _MERGE
    if merge is None:
        if _MERGE is None:
            _MERGE = ENV.decode_merge
        merge = _MERGE
    if merge not in ("launch", "fused"):
        raise ValueError(f"merge (RUNTIME_DECODE_MERGE) must be 'launch' or 'fused', got {merge!r}")
    return merge


def _interpreted() -> bool:
    return not isinstance(_paged_decode_split_kernel, triton.runtime.JITFunction)


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    page_table: torch.Tensor,  # int32 [B, max_pages]
    kv_lens: torch.Tensor,  # int32 [B], keys per sequence (the new token's included)
    scale: float,
    out: torch.Tensor | None = None,  # [B, Hq, D], q's dtype
    num_splits: int | None = None,
    max_kv_len: int | None = None,  # host int, only to choose num_splits when it is None
    tree_start: torch.Tensor | None = None,  # int32 [B]
    tree_bits: torch.Tensor | None = None,  # int64 [B]
    merge: str | None = None,  # "launch" | "fused" (None: RUNTIME_DECODE_MERGE)
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each sequence's single query over its first kv_lens[i] cached keys.
    With tree_start/tree_bits (tree verification, one row per draft-tree node), row i
    sees key p only when p < tree_start[i] or bit p - tree_start[i] of tree_bits[i] is set.
    With several splits their partial results are merged by a second launch, or with
    merge="fused" by the last split of each (sequence, KV head) to finish (an atomic count
    per pair; one launch fewer per layer, a few microseconds each at batch 1).

    The values of page_table and kv_lens are not checked (that would sync with the GPU):
    kv_lens[i] must not exceed max_pages * page_size and the page ids must be in range."""
    _check(q, k_cache, v_cache, page_table, kv_lens, out)
    bsz, hq, d = q.shape
    has_tree = tree_start is not None
    if has_tree:
        if tree_bits is None or tree_start.dtype != torch.int32 or tree_bits.dtype != torch.int64 \
                or tree_start.shape != (bsz,) or tree_bits.shape != (bsz,):
            raise ValueError("tree_start must be int32 [B] and tree_bits int64 [B], given together")
    else:
        tree_start = tree_bits = kv_lens  # unused by the kernel
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, q.device, max_kv_len)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")

    block_h = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(d)
    block_n, num_warps, num_stages = _launch_config(block_d)
    single = num_splits == 1
    fused = not single and _merge_mode(merge) == "fused"
    counters = _counters(q.device, bsz * hkv) if fused else kv_lens  # unused by the kernel unless fused
    if single:
        mid_o = mid_lse = out  # unused by the kernel; any tensor will do
        mo_strides, ml_strides = (0, 0, 0), (0, 0)
    else:
        mid_o = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
        mo_strides, ml_strides = mid_o.stride()[:3], mid_lse.stride()[:2]

    _paged_decode_split_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, page_table, kv_lens, tree_start, tree_bits, mid_o, mid_lse, out, counters,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        *mo_strides,
        *ml_strides,
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE_SIZE=page_size,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        SINGLE_SPLIT=single, IEEE_DOT=q.dtype == torch.float32,
        UPCAST=q.dtype == torch.bfloat16 and _interpreted(),
        HAS_TREE=has_tree, FUSED_MERGE=fused, BLOCK_S=triton.next_power_of_2(num_splits) if fused else 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single and not fused:
        _paged_decode_merge_kernel[(bsz, hq)](
            mid_o, mid_lse, out,
            num_splits,
            *mo_strides,
            *ml_strides,
            out.stride(0), out.stride(1),
            HEAD_DIM=d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
