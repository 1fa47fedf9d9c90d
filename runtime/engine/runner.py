"""Turns a scheduled batch into tensors, runs the model, and returns the logits rows.

Short work runs in "decode shape": every new token is its own attention row with its own
page-table row and key count (position + 1), so a decode step, a speculative verification
(the last token plus k drafts, or a draft tree whose nodes see only their ancestors) and a
drafter's catch-up are all the same kind of batch: the one the paged-decode kernel and the
captured CUDA graphs serve. Rows are cheap there: a row re-reads its sequence's keys, which
for a few rows per sequence costs far less than leaving the graph. Long prefill chunks
keep one attention row block per sequence (the prefill path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata
from runtime.engine.draft_tree import DeviceDrafts, DraftTree, PendingDraft
from runtime.engine.h2d import to_device
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, LlamaForCausalLM
from runtime.engine.scheduler import Batch

if TYPE_CHECKING:  # imports Triton, which CPU-only installs lack
    from runtime.engine.cuda_graph import CudaGraphDecoder

# Sequences with at most this many new tokens run in decode shape (one row per token, with
# its own key count), unless the whole batch fits the decode CUDA graphs: then every
# sequence does, and the step replays a graph instead of launching an eager prefill (on
# the H200, a 40-token prompt of SmolLM2 took ~30 ms eagerly, host-bound).
DECODE_SHAPE_MAX_Q = 16


class ForwardOut(NamedTuple):
    logits: torch.Tensor  # fp32 [N, V]: the rows that need logits, sequence by sequence
    hidden: torch.Tensor  # [N, H]: the final hidden states of those rows
    all_hidden: torch.Tensor | None  # [T, H]: every new token's, in batch order (when asked)


@dataclass
class _Rows:
    """Host-side description of one forward: per new token, and per attention row."""

    tokens: list[int]
    positions: list[int]  # rope positions
    slots: list[int]  # KV slot each token's K/V is written to
    # attention rows: q_lens (1 in decode shape), key counts, page lists, tree rule
    q_lens: list[int]
    kv_lens: list[int]
    page_lists: list[list[int]]
    tree_start: list[int]
    tree_bits: list[int]
    logit_rows: list[int]
    has_tree: bool = False
    # Rows whose token (and for trees rope offset and tree bits) are still on the device:
    # the drafts of one propose, and per such row (verify row, flat index into the drafts).
    device_drafts: DeviceDrafts | None = None
    device_rows: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    # Rows whose input token the previous, still running step samples (the overlap schedule:
    # the request's last token is a placeholder -(1 + j), j its row in that step's tokens):
    # (row, j) pairs, filled in on the device from those tokens.
    future_rows: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))

    @property
    def decode_shape(self) -> bool:
        return all(q == 1 for q in self.q_lens)


def build_rows(batch: Batch, drafts: dict[str, DraftTree | PendingDraft], page_size: int,
               max_decode_q: int = DECODE_SHAPE_MAX_Q) -> _Rows:
    """Token and attention rows of a batch. `drafts` (rid -> DraftTree) extends a decoding
    sequence past its last sampled token: node i of the tree is written at slot position
    start + 1 + i, sits at rope position start + depth(i), and sees the sequence before the
    tree plus its ancestors and itself. A PendingDraft's tokens (and a tree's depths and
    bits) stay on the device: its rows hold placeholders (rope position start, no bits)
    that the forward fills in from the device."""
    ps = page_size
    r = _Rows([], [], [], [], [], [], [], [], [])
    for s in batch.seqs:
        pages = s.req.pages
        tree = drafts.get(s.req.rid)
        first = len(r.tokens)
        if tree is None and s.q_len == 1:  # plain decode, the common row: no per-row lists
            p = s.start
            t = s.req.token_at(p)
            if t < 0:  # still being sampled by the step in flight (overlap.py)
                r.future_rows[0].append(first)
                r.future_rows[1].append(-1 - t)
                t = 0
            r.tokens.append(t)
            r.positions.append(p)
            r.q_lens.append(1)
            r.kv_lens.append(p + 1)
            r.tree_start.append(p + 1)
            r.page_lists.append(pages)
            r.tree_bits.append(0)
            r.slots.append(pages[p // ps] * ps + p % ps)
            if s.num_logits:
                r.logit_rows.append(first)
            continue
        if tree is not None:
            if s.q_len != 1 + len(tree):
                raise ValueError(f"{s.req.rid}: {s.q_len} rows scheduled for a tree of {len(tree)} nodes")
            base = s.start + 1  # the tree starts after the last sampled token
            r.has_tree = r.has_tree or not tree.is_chain
            n = len(tree)
            if isinstance(tree, PendingDraft):
                if r.device_drafts is not None and r.device_drafts is not tree.drafts:
                    raise ValueError("drafts of more than one propose in one batch")
                r.device_drafts = tree.drafts
                width = tree.drafts.tokens.shape[1]
                r.device_rows[0].extend(range(first + 1, first + 1 + n))
                r.device_rows[1].extend(range(tree.row * width, tree.row * width + n))
                r.tokens += [s.req.token_at(s.start)] + [0] * n
                if tree.is_chain:
                    r.positions += range(s.start, s.start + n + 1)
                    r.tree_bits += [0] + [(2 << i) - 1 for i in range(n)]
                else:
                    r.positions += [s.start] * (n + 1)
                    r.tree_bits += [0] * (n + 1)
            else:
                r.tokens += [s.req.token_at(s.start), *tree.tokens]
                r.positions += [s.start] + [s.start + d for d in tree.depths()]
                r.tree_bits += [0, *tree.ancestors_mask()]
            slot_pos = range(s.start, base + len(tree))
            r.q_lens += [1] * s.q_len
            r.kv_lens += [p + 1 for p in slot_pos]
            r.tree_start += [base] * s.q_len
            r.page_lists += [pages] * s.q_len
        else:
            slot_pos = range(s.start, s.start + s.q_len)
            r.tokens += s.req.ids_between(s.start, s.start + s.q_len)
            r.positions += slot_pos
            if s.q_len <= max_decode_q:
                r.q_lens += [1] * s.q_len
                r.kv_lens += [p + 1 for p in slot_pos]
                r.tree_start += [p + 1 for p in slot_pos]
                r.page_lists += [pages] * s.q_len
                r.tree_bits += [0] * s.q_len
            else:
                end = s.start + s.q_len
                r.q_lens.append(s.q_len)
                r.kv_lens.append(end)
                r.tree_start.append(end)
                r.page_lists.append(pages)
                r.tree_bits.append(0)
        r.slots += [pages[p // ps] * ps + p % ps for p in slot_pos]
        end = len(r.tokens)
        r.logit_rows += range(end - s.num_logits, end)
        assert end - first == s.q_len
    return r


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        attn: AttentionBackend,
        device: torch.device,
        graphs: CudaGraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn
        self.device = device
        self.graphs = graphs
        # Batches of at most this many new tokens run every row in decode shape (see DECODE_SHAPE_MAX_Q).
        self.graph_rows = graphs.max_batch if graphs is not None else 0

    @torch.inference_mode()
    def forward(
        self, batch: Batch, drafts: dict[str, DraftTree] | None = None, all_hidden: bool = False,
        future_tokens: torch.Tensor | None = None,
    ) -> ForwardOut:
        """Logits and hidden states of the rows that need logits, sequence by sequence in
        batch order (every row of a sequence with drafts). `all_hidden` also returns the
        hidden states of every new token. `future_tokens`: the tokens [N] (device) of the step
        still in flight, which placeholder tokens in the batch stand for (overlap.py)."""
        total = sum(s.q_len for s in batch.seqs)
        max_q = total if total <= self.graph_rows else DECODE_SHAPE_MAX_Q
        rows = build_rows(batch, drafts or {}, self.pool.page_size, max_q)
        future = None
        if rows.future_rows[0]:
            if future_tokens is None:
                raise ValueError("the batch has placeholder tokens but no step in flight to take them from")
            dev = future_tokens.device
            future = (future_tokens, to_device(rows.future_rows[0], torch.int64, dev),
                      to_device(rows.future_rows[1], torch.int64, dev))
        if (self.graphs is not None and rows.decode_shape
                and self.graphs.can_run(len(rows.tokens), max(len(p) for p in rows.page_lists))):
            device_rows = (rows.device_drafts, rows.device_rows) if rows.device_drafts is not None else None
            logits, h = self.graphs.run(
                rows.tokens, rows.positions, rows.slots, rows.page_lists, rows.kv_lens, rows.tree_start, rows.tree_bits,
                device_rows=device_rows, future=future,
            )
            hidden = h
            if len(rows.logit_rows) != len(rows.tokens):
                pick = to_device(rows.logit_rows, torch.int64, self.device)
                logits, hidden = logits[pick], h[pick]
            return ForwardOut(logits, hidden, h if all_hidden else None)
        dev = self.device
        tree = rows.has_tree
        meta = AttentionMetadata.build(
            rows.q_lens, rows.kv_lens, rows.page_lists, self.pool.page_size, dev,
            tree_start=rows.tree_start if tree else None, tree_bits=rows.tree_bits if tree else None,
        )
        as_dev = lambda xs: to_device(xs, torch.int64, dev)  # noqa: E731
        ids, positions = as_dev(rows.tokens), as_dev(rows.positions)
        if future is not None:
            src, at, pick = future
            ids[at] = src[pick]
        if rows.device_drafts is not None:
            rows.device_drafts.write_rows(rows.device_rows, ids, positions, meta.tree_bits)
        self.attn.prepare(meta)
        h = self.model(ids, positions, ForwardContext(self.pool, self.attn, as_dev(rows.slots)))
        hidden = h if len(rows.logit_rows) == len(rows.tokens) else h[as_dev(rows.logit_rows)]
        return ForwardOut(self.model.compute_logits(hidden), hidden, h if all_hidden else None)
