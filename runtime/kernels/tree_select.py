"""The final pick of an EAGLE-2 draft tree in one Triton kernel (runtime/engine/speculative/
tree.py, TreeBuilder.select): per tree, the n candidates with the best cumulative scores,
in candidate order (parents before children, siblings best first), with each node's parent
(an index into the kept nodes, -1 for the root), depth and ancestor bits (DraftTree.
ancestors_mask). It is the same pick as torch's path, which takes about forty small
launches (a top-k, a sort, a searchsorted, and pointer jumping for the bits).

Scores are compared as TreeBuilder does: key = score (fp64) - candidate index * TIE_EPS, so
a child, whose score can round to its parent's, still ranks below it, and the kept set
holds every kept node's parent.

Candidates are depth-major: `branch` at depth 1, then branch^2 per further depth.
CUDA graphs: the grid depends only on the shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import check_placement


@triton.jit
def _tree_select_kernel(
    CandTok, CandScore, CandPar,  # [N, C]: token int64, cumulative score fp32, parent's candidate (-1: root)
    Rank,  # int32 [N, C] scratch: each kept candidate's index among the kept
    OutTok, OutPar, OutDepth, OutBits,  # int64 [N, n]
    C, count, n_keep, tie_eps,
    B: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, MAX_DEPTH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BC)
    valid = c < count
    key = tl.load(CandScore + t * C + c, mask=valid, other=0.0).to(tl.float64) - c.to(tl.float64) * tie_eps
    key = tl.where(valid, key, float("-inf"))
    kept = c < 0
    for _ in range(n_keep):
        at = tl.argmax(key, 0, tie_break_left=True)
        kept = kept | (c == at)
        key = tl.where(c == at, float("-inf"), key)
    rank = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(Rank + t * C + c, rank, mask=kept)
    out = t * n_keep + rank
    tl.store(OutTok + out, tl.load(CandTok + t * C + c, mask=kept, other=0), mask=kept)
    tl.store(OutDepth + out, tl.where(c < B, 1, 2 + (c - B) // (B * B)).to(tl.int64), mask=kept)
    tl.debug_barrier()  # Rank is read back at other candidates' parents
    par = tl.load(CandPar + t * C + c, mask=kept, other=-1)
    has = kept & (par >= 0)
    parent = tl.load(Rank + t * C + tl.maximum(par, 0), mask=has, other=-1).to(tl.int64)
    tl.store(OutPar + out, tl.where(has, parent, -1), mask=kept)
    tl.debug_barrier()  # OutPar is walked upwards below
    s = tl.arange(0, BN)
    sv = s < n_keep
    one = tl.full([BN], 1, dtype=tl.int64)
    bits = tl.where(sv, one << s.to(tl.int64), 0)
    up = tl.load(OutPar + t * n_keep + s, mask=sv, other=-1)
    for _ in tl.static_range(MAX_DEPTH - 1):  # a node has at most MAX_DEPTH - 1 ancestors
        has_up = sv & (up >= 0)
        bits = bits | tl.where(has_up, one << tl.maximum(up, 0), 0)
        up = tl.load(OutPar + t * n_keep + tl.maximum(up, 0), mask=has_up, other=-1)
        up = tl.where(has_up, up, -1)
    tl.store(OutBits + t * n_keep + s, bits, mask=sv)


def tree_select(cand_tok: torch.Tensor, cand_score: torch.Tensor, cand_par: torch.Tensor, count: int,
                branch: int, max_depth: int, max_nodes: int,
                tie_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `count` columns of cand_tok, cand_score, cand_par ([N, C], as tree_grow
    writes them) -> the best min(max_nodes, count) per tree: tokens, parents, depths and
    ancestor bits, int64 [N, n] each (TreeBuilder.select's, and ancestor_bits of them)."""
    if cand_tok.dim() != 2 or cand_score.shape != cand_tok.shape or cand_par.shape != cand_tok.shape:
        raise ValueError(f"tree_select: cand_tok, cand_score and cand_par must be one [N, C] shape, got "
                         f"{tuple(cand_tok.shape)}, {tuple(cand_score.shape)}, {tuple(cand_par.shape)}")
    for name, t, dtype in (("cand_tok", cand_tok, torch.int64), ("cand_score", cand_score, torch.float32),
                           ("cand_par", cand_par, torch.int64)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"tree_select: {name} must be contiguous {dtype}, got {t.dtype}")
    n_trees, cap = cand_tok.shape
    if not 1 <= count <= cap or branch < 1 or max_depth < 1 or not 1 <= max_nodes <= 63:
        raise ValueError(f"tree_select: need 1 <= count <= C={cap}, branch >= 1, max_depth >= 1 and 1 <= max_nodes "
                         f"<= 63 (one bit per node), got count {count}, branch {branch}, max_depth {max_depth}, "
                         f"max_nodes {max_nodes}")
    check_placement("tree_select", {"cand_tok": cand_tok, "cand_score": cand_score, "cand_par": cand_par})
    n = min(max_nodes, count)
    dev = cand_tok.device
    out = [torch.empty(n_trees, n, dtype=torch.int64, device=dev) for _ in range(4)]
    if n_trees:
        rank = torch.empty(n_trees, cap, dtype=torch.int32, device=dev)
        _tree_select_kernel[(n_trees,)](
            cand_tok, cand_score, cand_par, rank, *out, cap, count, n, tie_eps,
            B=branch, BC=triton.next_power_of_2(count), BN=triton.next_power_of_2(n), MAX_DEPTH=max_depth,
            num_warps=4,
        )
    return out[0], out[1], out[2], out[3]
