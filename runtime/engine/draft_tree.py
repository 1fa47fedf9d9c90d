"""Draft tokens to verify: a chain or a tree after a request's last token, on the host
(DraftTree) or still on the device (DeviceDrafts, one row per request: PendingDraft)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import MAX_TREE_NODES  # verification masks a node's ancestors with one int64 per row
from runtime.engine.h2d import to_device


@dataclass
class DraftTree:
    """A tree of draft tokens after a request's last token (the root, not stored here).
    Node i is `tokens[i]`; its parent is node `parents[i]` (-1: the root). Parents come
    before children; siblings have distinct tokens, most likely first. A chain d1..dk is
    the tree with parents [-1, 0, 1, ..., k-2]."""

    tokens: list[int]
    parents: list[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("DraftTree: tokens and parents differ in length")
        if len(self.tokens) > MAX_TREE_NODES:
            raise ValueError(f"DraftTree: {len(self.tokens)} nodes, at most {MAX_TREE_NODES} (one bit each in a row mask)")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"DraftTree: node {i} has parent {p}; parents must come first")

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node (children of the root have depth 1)."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def ancestors_mask(self) -> list[int]:
        """Bit j of entry i is set when node j is node i or one of its ancestors."""
        m: list[int] = []
        for i, p in enumerate(self.parents):
            m.append((1 << i) | (m[p] if p >= 0 else 0))
        return m

    def truncated(self, n: int) -> "DraftTree":
        """The first n nodes (still a tree: parents come first)."""
        return DraftTree(self.tokens[:n], self.parents[:n])

    def within_depth(self, depth: int) -> "DraftTree":
        """The nodes at depth <= `depth` (a parent is never deeper than its child)."""
        keep, new_index, parents = [], {-1: -1}, []
        for i, d in enumerate(self.depths()):
            if d <= depth:
                new_index[i] = len(keep)
                keep.append(i)
                parents.append(new_index[self.parents[i]])
        return DraftTree([self.tokens[i] for i in keep], parents)


@dataclass(eq=False)
class DeviceDrafts:
    """The drafts of one propose, still on the device: row i of `tokens` (int64 [B, n]) is
    request i's chain (`parents` None) or tree (`parents` int64 [B, n], as DraftTree's).
    For a tree the drafter also gives what a verify row needs from its shape: each node's
    depth and DraftTree.ancestors_mask, int64 [B, n] each. A verify step is then built and
    queued without reading the drafts; `start_read` and `fetch` read them (with the verify's
    own result) in one host sync. `max_depth` bounds every tree's depth (for a chain: n)."""

    tokens: torch.Tensor
    parents: torch.Tensor | None = None
    depths: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    max_depth: int = 0
    _host: list[DraftTree] | None = None
    _read: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def __post_init__(self) -> None:
        if not self.max_depth:
            self.max_depth = self.tokens.shape[1]

    def views(self) -> list[PendingDraft]:
        n = self.tokens.shape[1]
        return [PendingDraft(self, i, n) for i in range(self.tokens.shape[0])]

    def write_rows(self, rows: tuple[list[int], list[int]], ids: torch.Tensor, positions: torch.Tensor,
                   bits: torch.Tensor | None) -> None:
        """Fill a forward's inputs from the device: verify row rows[0][j] takes flat draft
        rows[1][j]: its token into `ids`, and for trees its depth added to `positions`
        (which hold the tree's rope base) and its ancestor mask into `bits`."""
        b, n = self.tokens.shape
        if rows[1] == list(range(b * n)) and rows[0] == [i * (n + 1) + 1 + j for i in range(b) for j in range(n)]:
            # Every request verifies all its drafts, in the drafts' order: strided views.
            def drafted(x: torch.Tensor) -> torch.Tensor:
                return x[: b * (n + 1)].view(b, n + 1)[:, 1:]

            drafted(ids).copy_(self.tokens)
            if self.depths is not None:
                drafted(positions).add_(self.depths)
                drafted(bits).copy_(self.bits)
            return
        dst, src = to_device(rows, torch.int64, ids.device)
        ids.index_copy_(0, dst, self.tokens.reshape(-1).index_select(0, src))
        if self.depths is not None:
            positions.index_add_(0, dst, self.depths.reshape(-1).index_select(0, src))
            bits.index_copy_(0, dst, self.bits.reshape(-1).index_select(0, src))

    def start_read(self, extra: torch.Tensor | None = None) -> None:
        """Queue the copy of the drafts and `extra` (an int64 device tensor, e.g. the verify
        step's argmax) to the host; `fetch` waits for this copy only, not for work queued
        after it."""
        parts = [self.tokens.reshape(-1)]
        if self.parents is not None:
            parts.append(self.parents.reshape(-1))
        if extra is not None:
            parts.append(extra.reshape(-1).long())
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flat.device))
            self._read = (host, done)
        else:
            self._read = (flat, None)

    def fetch(self) -> list[int] | None:
        """The drafts on the host (read once), and the values of start_read's `extra` as a
        flat list (None without one). One host sync."""
        if self._read is None:
            if self._host is not None:
                return None
            self.start_read()
        host, done = self._read
        self._read = None
        if done is not None:
            done.synchronize()
        flat = host.tolist()
        b, n = self.tokens.shape
        toks, flat = flat[: b * n], flat[b * n :]
        if self.parents is not None:
            pars, flat = flat[: b * n], flat[b * n :]
        if self._host is None:
            if self.parents is None:
                self._host = [DraftTree.chain(toks[i * n : (i + 1) * n]) for i in range(b)]
            else:
                self._host = [DraftTree(toks[i * n : (i + 1) * n], pars[i * n : (i + 1) * n]) for i in range(b)]
        return flat if len(flat) else None


@dataclass
class PendingDraft:
    """Request `row`'s draft in a DeviceDrafts, cut to its first n nodes."""

    drafts: DeviceDrafts
    row: int
    n: int

    def __len__(self) -> int:
        return self.n

    @property
    def is_chain(self) -> bool:
        return self.drafts.parents is None

    def truncated(self, n: int) -> "PendingDraft":
        return PendingDraft(self.drafts, self.row, min(self.n, n))

    def within_depth(self, depth: int) -> "PendingDraft | DraftTree":
        if self.is_chain:
            return self.truncated(depth)
        if depth >= self.drafts.max_depth:
            return self
        return self.resolve().within_depth(depth)  # near max_tokens only: reads the drafts

    def resolve(self) -> DraftTree:
        """The host DraftTree (reads the drafts if nothing has yet)."""
        self.drafts.fetch()
        return self.drafts._host[self.row].truncated(self.n)
