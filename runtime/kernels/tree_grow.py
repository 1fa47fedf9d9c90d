"""One depth of an EAGLE-2 draft tree in one Triton kernel (runtime/engine/speculative/
tree.py, TreeBuilder.grow): every frontier node's `branch` best children become candidates,
scored by cumulative log-probability, and the best `branch` of them become the next frontier.

In torch this is a dozen small launches per depth (an add, a repeat, a top-k, gathers and
index arithmetic). At batch 1 each costs a launch's latency, not its work, so one program per
tree does it all.

Candidate f*b + j is child j of frontier node f. The frontier is picked best first; equal
scores go to the lower candidate. CUDA graphs: the grid depends only on the shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import check_placement


@triton.jit
def _tree_grow_kernel(
    FrontScore, FrontIndex, Logp, Tokens,  # [N, b] fp32, [N, b] int64, [N, b*b] fp32, [N, b*b] int64
    CandTok, CandScore, CandPar,  # [N, C]: columns [count, count + b*b) are written
    NextScore, NextIndex, NextTok, NextParent,  # [N, b] each
    count, C,
    B: tl.constexpr, BB: tl.constexpr,  # branch, next power of two >= b*b
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BB)
    valid = c < B * B
    f = c // B  # the frontier node each candidate is a child of
    parent_score = tl.load(FrontScore + n * B + f, mask=valid, other=0.0)
    parent_index = tl.load(FrontIndex + n * B + f, mask=valid, other=0)
    score = parent_score + tl.load(Logp + n * B * B + c, mask=valid, other=0.0)
    tok = tl.load(Tokens + n * B * B + c, mask=valid, other=0)
    row = n * C + count + c
    tl.store(CandTok + row, tok, mask=valid)
    tl.store(CandScore + row, score, mask=valid)
    tl.store(CandPar + row, parent_index, mask=valid)
    score = tl.where(valid, score, float("-inf"))
    for j in tl.static_range(B):
        best = tl.max(score, 0)
        at = tl.argmax(score, 0, tie_break_left=True)
        tl.store(NextScore + n * B + j, best)
        tl.store(NextIndex + n * B + j, count + at)
        tl.store(NextTok + n * B + j, tl.sum(tl.where(c == at, tok, 0), 0))
        tl.store(NextParent + n * B + j, at // B)
        score = tl.where(c == at, float("-inf"), score)


def tree_grow(front_score: torch.Tensor, front_index: torch.Tensor, logp: torch.Tensor, tokens: torch.Tensor,
              cand_tok: torch.Tensor, cand_score: torch.Tensor, cand_par: torch.Tensor,
              count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """front_score fp32 [N, b] and front_index int64 [N, b] (the frontier's cumulative scores
    and candidate indices), logp fp32 and tokens int64 [N, b, b] (each frontier node's best
    children). Writes the b*b new candidates into columns [count, count + b*b) of cand_tok,
    cand_score and cand_par ([N, C]: token, cumulative score, parent's candidate index).
    Returns the next frontier: scores, candidate indices, tokens and the parent's frontier
    row, [N, b] each, best first."""
    n, b = front_score.shape
    if front_index.shape != (n, b) or logp.shape != (n, b, b) or tokens.shape != (n, b, b):
        raise ValueError(f"tree_grow: front_score and front_index must be [N, b], logp and tokens [N, b, b]; got "
                         f"{tuple(front_score.shape)}, {tuple(front_index.shape)}, {tuple(logp.shape)}, "
                         f"{tuple(tokens.shape)}")
    cap = cand_tok.shape[1] if cand_tok.dim() == 2 else -1
    if any(t.shape != (n, cap) for t in (cand_tok, cand_score, cand_par)) or not 0 <= count <= cap - b * b:
        raise ValueError(f"tree_grow: candidate buffers must be [N={n}, C] with C >= count + b*b = {count + b * b}")
    for name, t, dtype in (("front_score", front_score, torch.float32), ("front_index", front_index, torch.int64),
                           ("logp", logp, torch.float32), ("tokens", tokens, torch.int64),
                           ("cand_tok", cand_tok, torch.int64), ("cand_score", cand_score, torch.float32),
                           ("cand_par", cand_par, torch.int64)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"tree_grow: {name} must be contiguous {dtype}, got {t.dtype}")
    check_placement("tree_grow", {"front_score": front_score, "front_index": front_index, "logp": logp,
                                  "tokens": tokens, "cand_tok": cand_tok, "cand_score": cand_score,
                                  "cand_par": cand_par})
    dev = front_score.device
    nxt_score = torch.empty(n, b, dtype=torch.float32, device=dev)
    nxt_index, nxt_tok, nxt_parent = (torch.empty(n, b, dtype=torch.int64, device=dev) for _ in range(3))
    if n:
        _tree_grow_kernel[(n,)](
            front_score, front_index, logp, tokens, cand_tok, cand_score, cand_par,
            nxt_score, nxt_index, nxt_tok, nxt_parent, count, cap,
            B=b, BB=triton.next_power_of_2(b * b), num_warps=1 if b * b <= 64 else 4,
        )
    return nxt_score, nxt_index, nxt_tok, nxt_parent
