"""The EAGLE head's drafting on dense [B, T] batches: what EagleDrafter does after every
pair at once. train_draft.py trains with it (the teacher-forced pass plus unrolled draft
steps) and scores heads with it (top-1, and the accept length of chains and trees, with
the same TreeBuilder the drafter uses).

A batch row is one sequence's pairs t = 0 .. T-1, pair t = (x_p, f_{p-1}) at position p.
The teacher-forced pass runs every pair with causal attention, exactly as the drafter's
committed pairs. A draft node after pair t at depth d (position p + d) attends the real
pairs 0..t, the draft nodes of its own tree that are its ancestors, and itself: the tree
rule of attention/base.py. Keys and values are expanded to the query heads (GQA) once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.engine.speculative.eagle_head import EagleHead
from runtime.engine.speculative.tree import TreeBuilder, best_tokens, top_logprobs
from runtime.engine.model import LlamaForCausalLM


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, T]: x_p of pair t (0-padded)
    feat_in: torch.Tensor  # [B, T, H]: f_{p-1}, the pair's feature
    feat_out: torch.Tensor  # [B, T, H]: f_p, what the head predicts
    positions: torch.Tensor  # int64 [B, T]: p
    lens: torch.Tensor  # int64 [B]: valid pairs per row
    first: torch.Tensor  # int64 [B]: the first pair whose token was generated (drafting starts there)

    def valid(self, shift: int = 0) -> torch.Tensor:
        """bool [B, T]: pairs t at or after `first` with a pair t + shift in the row."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :]
        return (t >= self.first[:, None]) & (t + shift < self.lens[:, None])

    def shifted(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """x [B, T, ...] moved j pairs left (x[:, t + j] at t), zero-padded."""
        out = torch.zeros_like(x)
        if j < x.shape[1]:
            out[:, : x.shape[1] - j] = x[:, j:]
        return out


@dataclass
class Context:
    """The teacher-forced pass: predicted features and the real pairs' keys/values."""

    feat: torch.Tensor  # [B, T, H]: f^_p for every pair
    k: torch.Tensor  # [B, Hq, T, D], rotary applied, GQA-expanded
    v: torch.Tensor  # [B, Hq, T, D]


def context(head: EagleHead, target: LlamaForCausalLM, b: Batch) -> Context:
    x = head.project(target.model.embed_tokens(b.tokens), b.feat_in)
    q, k, v = head.qkv(x, b.positions)
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head.layer.self_attn.scale,
                                         enable_gqa=rep != 1)
    return Context(head.finish(x, out), k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))


class DraftKV:
    """Keys/values of the draft nodes run so far, per tree: depth-major, `nodes` per depth."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []  # per depth [B, Hq, T, F, D]
        self.v: list[torch.Tensor] = []


def draft_step(head: EagleHead, ctx: Context, kv: DraftKV, x: torch.Tensor, positions: torch.Tensor,
               bits: torch.Tensor) -> torch.Tensor:
    """Run F draft nodes per pair: x [B, T, F, H] (project's output) at positions int64
    [B, T] (the nodes' depth already added), bits int64 [B, T, F] (bit s: draft slot s is
    visible; this depth's slots come after those in `kv`, which this call extends).
    Returns the predicted features [B, T, F, H]."""
    bsz, t, f, h = x.shape
    q, k, v = head.qkv(x.reshape(bsz, t * f, h), positions[:, :, None].expand(bsz, t, f).reshape(bsz, t * f))
    hq, d = q.shape[1], q.shape[3]
    rep = hq // k.shape[1]
    kv.k.append(k.repeat_interleave(rep, 1).view(bsz, hq, t, f, d))
    kv.v.append(v.repeat_interleave(rep, 1).view(bsz, hq, t, f, d))
    tk, tv = torch.cat(kv.k, 3), torch.cat(kv.v, 3)  # [B, Hq, T, S, D]
    s = tk.shape[3]
    scale = head.layer.self_attn.scale
    s_real = (q @ ctx.k.transpose(-1, -2)).view(bsz, hq, t, f, t)  # query (t, f) x real pair t'
    s_tree = torch.einsum("bhtfd,bhtsd->bhtfs", q.view(bsz, hq, t, f, d), tk)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None, :, None, :]
    slots = torch.arange(s, device=x.device)
    visible = ((bits[..., None] >> slots) & 1).bool()[:, None]  # [B, 1, T, F, S]
    scores = torch.cat((s_real.float().masked_fill(~causal, float("-inf")),
                        s_tree.float().masked_fill(~visible, float("-inf"))), -1)
    p = (scores * scale).softmax(-1).to(tv.dtype)
    out = (p[..., :t].reshape(bsz, hq, t * f, t) @ ctx.v).view(bsz, hq, t, f, d)
    out = out + torch.einsum("bhtfs,bhtsd->bhtfd", p[..., t:], tv)
    return head.finish(x.reshape(bsz, t * f, h), out.reshape(bsz, hq, t * f, d)).view(bsz, t, f, h)


@torch.no_grad()
def draft_trees(head: EagleHead, target: LlamaForCausalLM, b: Batch, depth: int, branch: int = 1,
                max_nodes: int = 0, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree (branch 1: the chain of `depth` tokens) EagleDrafter proposes after every
    pair, with real pairs up to it as context: tokens, parents int64 [B, T, n]."""
    w = head.vocab(target.lm_head.weight)
    ctx = context(head, target, b)
    bsz, t, h = ctx.feat.shape
    m = bsz * t
    chain = branch == 1  # argmaxes, as the drafter's chain path (no TreeBuilder)
    tree = None if chain else TreeBuilder(branch, depth)
    if chain:
        drafted = [_chunked(lambda x: best_tokens(x, w), ctx.feat.reshape(m, h), chunk_rows)[:, None]]
        front_tokens, front_parent = drafted[0], torch.zeros(m, 1, dtype=torch.int64, device=ctx.feat.device)
    else:
        front = tree.start(*top_logprobs(ctx.feat.reshape(m, h), w, branch, chunk_rows))
        front_tokens, front_parent = front.tokens, front.parent
    feats = ctx.feat.reshape(m, 1, h)
    bits = torch.zeros(m, 1, dtype=torch.int64, device=feats.device)
    node = torch.arange(branch, device=feats.device)
    kv = DraftKV()
    for d in range(1, depth):
        own = (d - 1) * branch + node
        bits = bits.gather(1, front_parent) | (torch.ones_like(own) << own)
        feat_in = feats.gather(1, front_parent[..., None].expand(m, branch, h))
        x = head.project(target.model.embed_tokens(front_tokens), feat_in).view(bsz, t, branch, h)
        out = draft_step(head, ctx, kv, x, b.positions + d, bits.view(bsz, t, branch))
        feats = out.reshape(m, branch, h)
        if chain:
            drafted.append(_chunked(lambda x: best_tokens(x, w), feats.reshape(m, h), chunk_rows)[:, None])
            front_tokens = drafted[-1]
        else:
            front = tree.grow(*top_logprobs(feats, w, branch, chunk_rows))
            front_tokens, front_parent = front.tokens, front.parent
    if chain:
        tokens = torch.cat(drafted, 1)
        parents = torch.arange(-1, depth - 1, device=tokens.device).expand(m, depth)
    else:
        tokens, parents, _, _ = tree.select(max_nodes)
    return tokens.view(bsz, t, -1), parents.reshape(bsz, t, -1)


def _chunked(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn over x [M, ...] in chunks of `rows` (bounds the [rows, V] logits held at once)."""
    step = rows if rows > 0 else max(1, x.shape[0])
    return torch.cat([fn(x[i : i + step]) for i in range(0, x.shape[0], step)])


def accept_lengths(tokens: torch.Tensor, parents: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Greedy verification of trees: tokens, parents int64 [M, n] (a tree per row), want
    int64 [M, depth] (the target's next tokens). Returns int64 [M]: 1 + the depth of the
    deepest node whose path from the root matches `want`."""
    m, n = tokens.shape
    ok = torch.zeros(m, n, dtype=torch.bool, device=tokens.device)
    depth = torch.zeros(m, n, dtype=torch.int64, device=tokens.device)
    for i in range(n):  # parents come first
        par = parents[:, i]
        has = par >= 0
        pi = par.clamp(min=0)[:, None]
        d = torch.where(has, depth.gather(1, pi)[:, 0], 0) + 1
        path_ok = torch.where(has, ok.gather(1, pi)[:, 0], True)
        match = tokens[:, i] == want.gather(1, (d - 1).clamp(max=want.shape[1] - 1)[:, None])[:, 0]
        ok[:, i] = path_ok & match & (d <= want.shape[1])
        depth[:, i] = d
    return 1 + (depth * ok).amax(1)
