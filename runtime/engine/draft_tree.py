"""Draft tokens to verify: a chain or a tree after a request's last token."""
from __future__ import annotations

from dataclasses import dataclass

MAX_TREE_NODES = 63  # verification masks a node's ancestors with one int64 per row


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
