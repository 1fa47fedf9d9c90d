"""The attention backend seam: one forward's metadata and the abstract backend.

A forward step packs the new tokens of B sequences one after another (T tokens in all).
Sequence i contributes `q_lens[i]` new tokens whose keys/values have already been written
into the paged KV cache, so after the write it holds `kv_lens[i]` tokens. New token j of
sequence i sits at position `kv_lens[i] - q_lens[i] + j` and, without a custom mask, attends
every cached position up to and including its own (causal). Decode is q_len 1; chunked
prefill is any q_len; speculative verification is q_len k+1 (optionally with a tree mask).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from runtime.engine.h2d import to_device


@dataclass
class AttentionMetadata:
    q_lens: torch.Tensor  # int32 [B] device
    kv_lens: torch.Tensor  # int32 [B] device, cached + new tokens
    cu_q_lens: torch.Tensor  # int32 [B+1] device, prefix sums of q_lens
    page_table: torch.Tensor  # int32 [B, max_pages] device, page ids (padded with 0)
    q_lens_cpu: list[int]
    # Host copies of kv_lens for sizing launches; may be upper bounds of the device values
    # (CUDA-graph capture and EAGLE's drafting pass bounds): masks must use kv_lens.
    kv_lens_cpu: list[int]
    page_size: int
    # bool [B, max_q, max_kv] device, True = may attend; ANDed with the causal rule. Used by
    # tree verification, where a draft token sees only its ancestors.
    custom_mask: torch.Tensor | None = None
    # Tree attention in decode shape (every q_len 1; one row per tree node, each with its
    # own page-table row): row b attends position p < kv_lens[b] only when p < tree_start[b]
    # or bit (p - tree_start[b]) of tree_bits[b] is set, so a node sees the committed
    # context, its ancestors and itself (at most 63 tree slots). Rows outside any tree use
    # tree_start = kv_len. CUDA-graph friendly: plain per-row tensors, no [B, q, kv] mask.
    tree_start: torch.Tensor | None = None  # int32 [B]
    tree_bits: torch.Tensor | None = None  # int64 [B]

    @property
    def batch_size(self) -> int:
        return len(self.q_lens_cpu)

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens_cpu)

    @property
    def max_kv_len(self) -> int:
        return max(self.kv_lens_cpu)

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


    @classmethod
    def build(
        cls,
        q_lens: list[int],
        kv_lens: list[int],
        page_lists: list[list[int]],
        page_size: int,
        device: torch.device,
        custom_mask: torch.Tensor | None = None,
        tree_start: list[int] | None = None,
        tree_bits: list[int] | None = None,
    ) -> "AttentionMetadata":
        width = max(1, max((len(p) for p in page_lists), default=1))
        # Decode-shape rows of one sequence (a verify tree, a catch-up) share its page list
        # object: build each distinct list's row once, then index (784 rows of 16 sequences
        # took 15 ms of host time one row at a time, on the 2-core development machine).
        distinct: dict[int, int] = {}  # id of a page list -> its row in `lists`
        lists: list[list[int]] = []
        row_of = []
        for pages in page_lists:
            j = distinct.get(id(pages))
            if j is None:
                j = distinct[id(pages)] = len(lists)
                lists.append(pages)
            row_of.append(j)
        table = torch.zeros(len(lists), width, dtype=torch.int32)
        for i, pages in enumerate(lists):
            if pages:
                table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        if len(lists) != len(page_lists):
            table = table[torch.tensor(row_of)]
        q = torch.tensor(q_lens, dtype=torch.int32)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(q, 0, out=cu[1:])
        return cls(
            q_lens=to_device(q, torch.int32, device),
            kv_lens=to_device(kv_lens, torch.int32, device),
            cu_q_lens=to_device(cu, torch.int32, device),
            page_table=to_device(table, torch.int32, device),
            q_lens_cpu=list(q_lens),
            kv_lens_cpu=list(kv_lens),
            page_size=page_size,
            custom_mask=custom_mask,
            tree_start=None if tree_start is None else to_device(tree_start, torch.int32, device),
            tree_bits=None if tree_bits is None else to_device(tree_bits, torch.int64, device),
        )


def tree_allowed(positions: torch.Tensor, tree_start: torch.Tensor, tree_bits: torch.Tensor) -> torch.Tensor:
    """bool [B, P]: whether row b may attend key position positions[p] under the tree rule
    (positions before tree_start[b] always; later ones by bit of tree_bits[b])."""
    rel = positions[None, :].long() - tree_start[:, None].long()
    bit = (tree_bits[:, None] >> rel.clamp(0, 63)) & 1
    return (rel < 0) | ((rel < 64) & (bit == 1))


class AttentionBackend(ABC):
    """Computes attention of the packed new queries over the paged KV cache."""

    name: str = "abstract"

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per forward, before the first layer: derive per-step index tensors."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Attention for one layer, using the metadata given to `prepare`."""
