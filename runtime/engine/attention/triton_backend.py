"""Attention with Triton kernels: the split-K paged decode kernel for decode batches,
including speculative verification laid out as decode rows (one row per draft token or
tree node, with the per-row tree rule).

Batches with more than one new token per sequence (prefill, chunked prefill, speculative
verification, tree masks) fall back to TorchAttention for now: it is exact and handles every
mask, and prefill is compute-bound, so the fallback costs far less than decode would. A
Triton extend kernel can replace it without changing this class's interface.
"""
from __future__ import annotations

import torch

from kernels.paged_decode import default_num_splits, paged_decode
from runtime.engine.attention.base import AttentionBackend, AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention


class TritonAttention(AttentionBackend):
    name = "triton"

    def __init__(self, num_splits: int | None = None) -> None:
        # A fixed num_splits keeps the launch identical from step to step (CUDA graphs);
        # None picks one per step from the batch size and the longest sequence.
        self._fixed_splits = num_splits
        self._fallback = TorchAttention()
        self._meta: AttentionMetadata | None = None
        self._decode = False

    def prepare(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._decode = meta.is_decode and meta.custom_mask is None  # tree rows included
        if not self._decode:
            self._fallback.prepare(meta)

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        meta = self._meta
        if meta is None:
            raise RuntimeError("TritonAttention.forward called before prepare()")
        if not self._decode:
            return self._fallback.forward(q, k_cache, v_cache, scale)
        # Decode: T == B, one query row per sequence, already [B, Hq, D].
        splits = self._fixed_splits
        if splits is None:
            splits = default_num_splits(meta.batch_size, k_cache.shape[2], q.device, meta.max_kv_len)
        return paged_decode(q, k_cache, v_cache, meta.page_table, meta.kv_lens, scale, num_splits=splits,
                            tree_start=meta.tree_start, tree_bits=meta.tree_bits)
