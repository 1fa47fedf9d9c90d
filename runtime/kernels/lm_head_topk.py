"""A draft step's output head in two Triton kernels: lm_head's logits for a few hidden
rows, reduced as they are computed to each row's k best tokens and, for log-probabilities,
its log-sum-exp. The [rows, V] logits never reach memory.

Torch needs a GEMV, then an argmax or a log-softmax and a radix top-k. On the H200 with
SmolLM2 (V 49152), one argmax over a row took ~13 us and one top-k ~40 us, next to the
~16 us GEMV. Drafting runs this 5-8 times per step, at batch 1, so these costs add up.

1. `_partial_kernel`, grid (row blocks, vocabulary blocks): one [BM, BV] tile of logits,
   accumulated in fp32 over H. It writes the tile's max and sum of exp(logit - max) per
   row, and its k best (logit, column) pairs.
2. `_merge_kernel`, one program per row: merges the blocks' sums into the row's
   log-sum-exp, and picks the k best of the blocks' candidates. With a draft vocabulary
   (`ids`), a column becomes a token id.

Results are best first; ties go to the lower column. The logits are fp32 accumulations of
the inputs' products, never rounded to bf16 as torch's F.linear output is, so a value can
differ from torch's by that rounding, and a near-tie can order differently. Drafts are
proposals, and the target's verification keeps the outputs exact.

CUDA graphs: the grid depends only on the shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import INTERPRETED, check_dtype, check_placement

MAX_K = 16  # the candidates of every block are merged in one program
_BM, _BK = 16, 64  # tl.dot needs at least 16 rows


@triton.jit
def _partial_kernel(
    X, W, PartVal, PartIdx, PartMax, PartSum,
    M, V, H, stride_x, stride_w, NB,
    K: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    NEED_LSE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pm = tl.program_id(0)
    pv = tl.program_id(1)
    rows = pm * BM + tl.arange(0, BM)
    local = tl.arange(0, BV)
    cols = pv * BV + local
    rmask = rows < M
    cmask = cols < V
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16 inputs
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    acc = tl.where(cmask[None, :], acc, float("-inf"))
    out = rows.to(tl.int64) * NB + pv  # [BM]: this block's slot of each row
    if NEED_LSE:
        m = tl.max(acc, 1)
        s = tl.sum(tl.exp(acc - m[:, None]), 1)
        tl.store(PartMax + out, m, mask=rmask)
        tl.store(PartSum + out, s, mask=rmask)
    for j in tl.static_range(K):
        best = tl.max(acc, 1)
        at = tl.argmax(acc, 1, tie_break_left=True)
        tl.store(PartVal + out * K + j, best, mask=rmask)
        tl.store(PartIdx + out * K + j, pv * BV + at, mask=rmask)
        acc = tl.where(local[None, :] == at[:, None], float("-inf"), acc)


@triton.jit
def _merge_kernel(
    PartVal, PartIdx, PartMax, PartSum, Ids, OutVal, OutIdx,
    NB,
    K: tl.constexpr, BNB: tl.constexpr, BC: tl.constexpr, NEED_LSE: tl.constexpr, HAS_IDS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    lse = 0.0
    if NEED_LSE:
        b = tl.arange(0, BNB)
        bmask = b < NB
        m = tl.load(PartMax + r * NB + b, mask=bmask, other=float("-inf"))
        s = tl.load(PartSum + r * NB + b, mask=bmask, other=0.0)
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    c = tl.arange(0, BC)
    cmask = c < NB * K
    vals = tl.load(PartVal + r * NB * K + c, mask=cmask, other=float("-inf"))
    for j in tl.static_range(K):
        best = tl.max(vals, 0)
        at = tl.argmax(vals, 0, tie_break_left=True)
        col = tl.load(PartIdx + r * NB * K + at).to(tl.int64)
        if HAS_IDS:
            col = tl.load(Ids + col)
        tl.store(OutVal + r * K + j, best - lse)
        tl.store(OutIdx + r * K + j, col)
        vals = tl.where(c == at, float("-inf"), vals)


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, ids: torch.Tensor | None = None,
                 logprobs: bool = True, *, block_v: int | None = None,
                 num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, H] and lm_head rows weight [V, H] (one dtype) -> the k best tokens of each
    row's logits hidden @ weight.T: (values fp32 [M, k], token ids int64 [M, k]), best
    first. Values are log-probabilities over the V rows when `logprobs`, else raw logits.
    `ids` (int64 [V]) maps a row of weight to its token id (a draft vocabulary).
    block_v (vocabulary rows per program, a power of two >= 16) and num_warps are tuning
    knobs for benchmarks/bench_draft_kernels.py --sweep."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_head_topk: hidden must be [M, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    check_dtype("hidden", hidden)
    check_dtype("weight", weight, hidden.dtype)
    m, h = hidden.shape
    v = weight.shape[0]
    if not 1 <= k <= min(MAX_K, v):
        raise ValueError(f"lm_head_topk: k must be in [1, min({MAX_K}, V={v})], got {k}")
    tensors = {"hidden": hidden, "weight": weight}
    if ids is not None:
        if ids.dtype != torch.int64 or ids.shape != (v,):
            raise ValueError(f"lm_head_topk: ids must be int64 [V={v}], got {ids.dtype} {tuple(ids.shape)}")
        tensors["ids"] = ids
    check_placement("lm_head_topk", tensors)
    dev = hidden.device
    vals = torch.empty(m, k, dtype=torch.float32, device=dev)
    toks = torch.empty(m, k, dtype=torch.int64, device=dev)
    if m == 0:
        return vals, toks
    bv = block_v or (128 if v <= 65536 else 256)
    if bv < 16 or bv & (bv - 1):
        raise ValueError(f"lm_head_topk: block_v must be a power of two >= 16, got {bv}")
    nb = triton.cdiv(v, bv)
    part_val = torch.empty(m, nb, k, dtype=torch.float32, device=dev)
    part_idx = torch.empty(m, nb, k, dtype=torch.int32, device=dev)
    part_max = torch.empty(m, nb, dtype=torch.float32, device=dev)
    part_sum = torch.empty(m, nb, dtype=torch.float32, device=dev)
    _partial_kernel[(triton.cdiv(m, _BM), nb)](
        hidden, weight, part_val, part_idx, part_max, part_sum,
        m, v, h, hidden.stride(0), weight.stride(0), nb,
        K=k, BM=_BM, BV=bv, BK=_BK, NEED_LSE=logprobs,
        IEEE=hidden.dtype == torch.float32 or INTERPRETED, UPCAST=INTERPRETED,
        num_warps=num_warps,
    )
    bc = triton.next_power_of_2(nb * k)
    _merge_kernel[(m,)](
        part_val, part_idx, part_max, part_sum, ids if ids is not None else toks, vals, toks,
        nb,
        K=k, BNB=triton.next_power_of_2(nb), BC=bc, NEED_LSE=logprobs, HAS_IDS=ids is not None,
        num_warps=8 if bc >= 4096 else 4,
    )
    return vals, toks
