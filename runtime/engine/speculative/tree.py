"""Draft trees grown on the device, EAGLE-2 style, for many trees at once.

Depth 1 holds the `branch` most likely tokens after the root. Every later depth expands the
current frontier (`branch` nodes per tree): each frontier node gets its `branch` most likely
children, scored by cumulative log-probability (the product of the draft probabilities
along the path), and the best `branch` of those branch^2 candidates become the next
frontier. Every candidate ever scored stays eligible; the final tree is the `max_nodes`
candidates with the best cumulative scores. A child never scores above its parent, so the
chosen set contains every chosen node's parent (ties go to the earlier candidate, and a
parent always comes before its children).

branch 1 is a chain: the argmax token at every depth.

Everything stays on the device with shapes fixed by (trees, branch, depth): no host sync
until the caller reads the final tokens and parents once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Candidate scores are compared after subtracting index * TIE_EPS (in float64): strictly
# lower for a child than for its parent even when the child's log-probability rounds to 0.
TIE_EPS = 1e-9


class DraftVocab(NamedTuple):
    """The tokens drafts are scored over: lm_head's rows `weight` [V_d, H] for the token ids
    `ids` (int64 [V_d]), or with ids None the whole vocabulary (weight is lm_head's). A
    smaller draft vocabulary (EAGLE-3's) makes each draft step's lm_head GEMV and argmax or
    top-k cheaper; drafts stay proposals, so outputs are unchanged."""

    weight: torch.Tensor
    ids: torch.Tensor | None = None

    def tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Row indices of `weight` -> token ids."""
        return index if self.ids is None else self.ids[index]


@functools.cache
def _lm_head_kernels():
    """The kernels.lm_head_topk module where Triton is installed, else None."""
    try:
        from runtime.kernels import lm_head_topk
    except ImportError:
        return None
    return lm_head_topk


# When the fused kernel serves: each block of 16 rows reads lm_head once, so more rows
# favour a GEMM and torch's top-k. Measured on the H200 (bench_draft_kernels.py; its argmax
# reference then also ran an fp32 copy and an amax, so the k=1 margins are smaller than it
# showed): SmolLM2's head (28M weights) was faster fused up to 64 rows, top-8 by 3x;
# Llama-3-8B's (525M) at 16 rows but slower at 64 (457 against 354 us). Past a few hundred
# rows (train-draft's validation chunks) torch wins for any head.
FUSED_MAX_ROWS = 256
FUSED_LARGE_HEAD = 64 * 2**20  # lm_head elements above which only FUSED_LARGE_HEAD_ROWS rows are fused
FUSED_LARGE_HEAD_ROWS = 16


def fused_serves(rows: int, head_numel: int) -> bool:
    """Whether the fused lm_head + top-k kernel should serve `rows` rows over a head of
    `head_numel` weights (the measured crossover above)."""
    return rows <= (FUSED_LARGE_HEAD_ROWS if head_numel > FUSED_LARGE_HEAD else FUSED_MAX_ROWS)


def _fused(hidden: torch.Tensor, weight: torch.Tensor, k: int):
    """The fused lm_head + top-k kernel when it serves these rows (CUDA, fused_serves, k
    small), else None."""
    mod = _lm_head_kernels() if hidden.is_cuda else None
    rows = hidden.numel() // max(1, hidden.shape[-1])
    if (mod is None or k > mod.MAX_K or not fused_serves(rows, weight.numel())
            or hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        return None
    return mod.lm_head_topk


def top_logprobs(hidden: torch.Tensor, vocab: DraftVocab, k: int,
                 chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., H] -> the k best log-probabilities (fp32, normalised over the draft
    vocabulary) and their token ids (int64), each [..., k], best first. chunk_rows > 0
    bounds the [rows, V] logits held at once. On CUDA one fused kernel pair computes
    this without materialising the logits (runtime/kernels/lm_head_topk.py)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    shape = (*hidden.shape[:-1], k)
    fused = _fused(flat, vocab.weight, k)
    if fused is not None:
        v, t = fused(flat.to(vocab.weight.dtype).contiguous(), vocab.weight, k, vocab.ids)
        return v.view(shape), t.view(shape)
    step = chunk_rows if chunk_rows > 0 else max(1, flat.shape[0])
    vals, ids = [], []
    for i in range(0, flat.shape[0], step):
        logits = F.linear(flat[i : i + step].to(vocab.weight.dtype), vocab.weight).float()
        v, t = logits.topk(k, dim=-1)
        vals.append(v - logits.logsumexp(-1, keepdim=True))
        ids.append(vocab.tokens(t))
    return torch.cat(vals).view(shape), torch.cat(ids).view(shape)


def best_tokens(hidden: torch.Tensor, vocab: DraftVocab) -> torch.Tensor:
    """hidden [..., H] -> the argmax token of lm_head(hidden) over the draft vocabulary,
    int64 [...]: a chain's next draft (a chain needs no log-probabilities)."""
    fused = _fused(hidden, vocab.weight, 1)
    if fused is not None:
        flat = hidden.reshape(-1, hidden.shape[-1]).to(vocab.weight.dtype).contiguous()
        return fused(flat, vocab.weight, 1, vocab.ids, logprobs=False)[1].view(hidden.shape[:-1])
    return vocab.tokens(F.linear(hidden.to(vocab.weight.dtype), vocab.weight).argmax(-1))


def ancestor_bits(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """parents int64 [N, n] (DraftTree's, per row) -> DraftTree.ancestors_mask per row, int64
    [N, n], on the device by pointer jumping: after j rounds a node holds the bits of its
    2^j - 1 nearest ancestors, so ceil(log2(max_depth)) rounds cover a tree of that depth."""
    n = parents.shape[1]
    bits = torch.ones_like(parents) << torch.arange(n, device=parents.device)
    anc = parents
    for _ in range(max(1, (max_depth - 1).bit_length())):
        has = anc >= 0
        a = anc.clamp(min=0)
        bits = bits | torch.where(has, bits.gather(1, a), 0)
        anc = torch.where(has, anc.gather(1, a), -1)
    return bits


def greedy_path(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor,
                argmax: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of B trees on the device, without a host sync: tokens, parents,
    depths, bits int64 [B, n] (a DeviceDrafts' tree: parents index the same row, -1 the
    root; bits are ancestors_mask), argmax int64 [B, n+1] the target's token per verify row
    (row 0 the root, row 1+i node i). A node matches when its token is its parent row's
    argmax, and is accepted when it and all its ancestors match; siblings differ, so the
    accepted nodes form one path. Returns the tokens gained per tree (the accepted depth +
    the bonus token), int64 [B], and the verify rows along the path in depth order, int64
    [B, max_depth+1] (row 0 first; past the accepted depth, row 0 again)."""
    b, n = tokens.shape
    dev = tokens.device
    match = (tokens == argmax.gather(1, parents + 1)).long() << torch.arange(n, device=dev)
    ok = (bits & ~match.sum(1, keepdim=True)) == 0  # [B, n]
    gained = 1 + torch.where(ok, depths, 0).max(1).values
    # Each accepted node writes its row into its depth's column; column max_depth+1 takes
    # every other node, and is dropped.
    path = torch.zeros(b, max_depth + 2, dtype=torch.int64, device=dev)
    path.scatter_(1, torch.where(ok, depths, max_depth + 1), torch.arange(1, n + 1, device=dev).expand(b, n))
    return gained, path[:, : max_depth + 1]


@dataclass
class Frontier:
    """The nodes to run the head on next (per tree, `branch` of them, best first)."""

    tokens: torch.Tensor  # int64 [N, branch]
    parent: torch.Tensor  # int64 [N, branch]: the previous frontier's row that is each node's parent


class TreeBuilder:
    """N trees grown together, at most `max_depth` deep: `start`, then `grow` once per
    further depth, then `select`. Candidates live in [N, C] buffers, C = branch +
    (max_depth - 1) * branch^2. On CUDA, grow and select are one Triton kernel each
    (runtime/kernels/tree_grow.py, runtime/kernels/tree_select.py): at batch 1 the torch path's small ops
    cost a launch each, 80 more per step than the kernels for an 8x48 tree of depth 5
    (H200 trace: 585 launches and 1.61 ms of GPU time per step against 505 and 1.47 ms)."""

    def __init__(self, branch: int, max_depth: int, kernels: bool | None = None) -> None:
        """kernels: use the Triton kernels (None: on CUDA when Triton is installed; True:
        also on CPU, where they run only under TRITON_INTERPRET=1, for their tests)."""
        if branch < 1 or max_depth < 1:
            raise ValueError(f"branch and max_depth must be >= 1 (got {branch}, {max_depth})")
        self.branch = branch
        self.max_depth = max_depth
        self.capacity = branch + (max_depth - 1) * branch * branch
        self.depth = 0
        self._count = 0  # candidates so far (per tree)
        self._use_kernels = kernels
        self._kernels = False
        self._tok = self._score = self._par = None  # [N, C]: token int64, cumulative log-prob fp32, parent int64
        self._front_score: torch.Tensor | None = None  # fp32 [N, branch]
        self._front_index: torch.Tensor | None = None  # int64 [N, branch]: candidate index of each frontier node

    def start(self, logp: torch.Tensor, tokens: torch.Tensor) -> Frontier:
        """logp, tokens [N, branch]: the root's best children (top_logprobs' output)."""
        n, b = tokens.shape
        if b != self.branch:
            raise ValueError(f"start: {b} children per root, branch is {self.branch}")
        dev = tokens.device
        self._kernels = (self._use_kernels if self._use_kernels is not None
                         else _tree_kernels() is not None and tokens.is_cuda)
        self._tok = torch.zeros(n, self.capacity, dtype=torch.int64, device=dev)
        self._score = torch.zeros(n, self.capacity, dtype=torch.float32, device=dev)
        self._par = torch.full((n, self.capacity), -1, dtype=torch.int64, device=dev)
        self._tok[:, :b] = tokens
        self._score[:, :b] = logp
        self._count, self.depth = b, 1
        self._front_score = logp.float().contiguous()
        self._front_index = torch.arange(b, device=dev).expand(n, b).contiguous()
        return Frontier(tokens, torch.zeros(n, b, dtype=torch.int64, device=dev))

    def grow(self, logp: torch.Tensor, tokens: torch.Tensor) -> Frontier:
        """logp, tokens [N, branch, branch]: the best children of each frontier node (row f
        of the last Frontier). Returns the next frontier."""
        if self._front_score is None:
            raise RuntimeError("TreeBuilder.grow before start")
        if self.depth >= self.max_depth:
            raise RuntimeError(f"TreeBuilder.grow past max_depth {self.max_depth}")
        n, b = tokens.shape[0], self.branch
        if tokens.shape[1:] != (b, b):
            raise ValueError(f"grow: children {tuple(tokens.shape)}, expected [{n}, {b}, {b}]")
        lo, hi = self._count, self._count + b * b
        if self._kernels:
            grow, _ = _tree_kernels()
            self._front_score, self._front_index, front_tok, parent = grow(
                self._front_score, self._front_index, logp.float().contiguous(), tokens.contiguous(),
                self._tok, self._score, self._par, lo)
        else:
            score = (self._front_score[:, :, None] + logp.float()).reshape(n, b * b)
            flat = tokens.reshape(n, b * b)
            # Candidate f*b + j is child j of frontier node f.
            self._tok[:, lo:hi] = flat
            self._score[:, lo:hi] = score
            self._par[:, lo:hi] = self._front_index.repeat_interleave(b, dim=1)
            best = score.topk(b, dim=1).indices  # [N, b], best first
            self._front_score = score.gather(1, best)
            self._front_index = lo + best
            front_tok, parent = flat.gather(1, best), best // b
        self._count, self.depth = hi, self.depth + 1
        return Frontier(front_tok, parent)

    def select(self, max_nodes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best min(max_nodes, candidates) nodes of each tree, parents before children
        and siblings best first: tokens int64 [N, n], parents int64 [N, n] (a node's parent
        as an index into the same row, -1 for the root), depths int64 [N, n] and ancestor
        bits int64 [N, n] (DraftTree.ancestors_mask)."""
        c = self._count
        if self._kernels:
            _, select = _tree_kernels()
            return select(self._tok, self._score, self._par, c, self.branch, self.depth, max_nodes, TIE_EPS)
        tok, par = self._tok[:, :c], self._par[:, :c]
        n = min(max_nodes, c)
        key = self._score[:, :c].double() - torch.arange(c, device=tok.device, dtype=torch.float64) * TIE_EPS
        # Candidate order is depth-major and, within a parent, best first; ascending candidate
        # index therefore puts parents before children and keeps siblings best first.
        sel = key.topk(n, dim=1).indices.sort(dim=1).values  # [N, n]
        parent_cand = par.gather(1, sel)
        parent = torch.searchsorted(sel, parent_cand.clamp(min=0))
        parent = torch.where(parent_cand < 0, torch.full_like(parent, -1), parent)
        # Candidates are depth-major: `branch` at depth 1, then branch^2 per depth.
        b = self.branch
        depth = torch.where(sel < b, 1, 2 + (sel - b) // (b * b))
        return tok.gather(1, sel), parent, depth, ancestor_bits(parent, self.depth)


@functools.cache
def _tree_kernels():
    """(kernels.tree_grow.tree_grow, kernels.tree_select.tree_select) where Triton is
    installed, else None."""
    try:
        from runtime.kernels.tree_grow import tree_grow
        from runtime.kernels.tree_select import tree_select
    except ImportError:
        return None
    return tree_grow, tree_select
