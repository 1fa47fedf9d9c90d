"""Attention with Triton kernels: the split-K paged decode kernel for decode batches
(including speculative verification laid out as decode rows, with the per-row tree rule),
and the extend kernel for every other batch (prefill, chunked prefill, mixed batches of
prefill chunks and decode rows, tree rows among them).

Only a batch with a dense custom mask (tests; the engine lays trees out as decode rows
with tree bits instead) falls back to TorchAttention.
"""
from __future__ import annotations

import torch

from runtime.kernels.extend_attention import ExtendPlan, extend_attention
from runtime.kernels.paged_decode import default_num_splits, paged_decode
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
        self._mode = "decode"
        self._plan: ExtendPlan | None = None
        self._plan_key: tuple | None = None

    @classmethod
    def for_graph(cls, rows: int, num_kv_heads: int, device: torch.device, max_kv_len: int) -> "TritonAttention":
        """A backend for a CUDA graph of `rows` decode rows of up to max_kv_len keys: its
        split count fixed to what a step of that shape would pick."""
        return cls(num_splits=default_num_splits(rows, num_kv_heads, device, max_kv_len))

    def prepare(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._plan = self._plan_key = None
        if meta.custom_mask is not None:
            self._mode = "torch"
            self._fallback.prepare(meta)
        else:
            self._mode = "decode" if meta.is_decode else "extend"

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        meta = self._meta
        if meta is None:
            raise RuntimeError("TritonAttention.forward called before prepare()")
        if self._mode == "torch":
            return self._fallback.forward(q, k_cache, v_cache, scale)
        if self._mode == "extend":
            key = (q.shape[1], k_cache.shape[2], q.shape[2], q.dtype)
            if key != self._plan_key:  # once per step: every layer shares the heads and dtype
                self._plan = ExtendPlan(meta.q_lens_cpu, *key, q.device)
                self._plan_key = key
            return extend_attention(q, k_cache, v_cache, meta.page_table, meta.cu_q_lens, meta.kv_lens, scale,
                                    self._plan, tree_start=meta.tree_start, tree_bits=meta.tree_bits)
        # Decode: T == B, one query row per sequence, already [B, Hq, D].
        splits = self._fixed_splits
        if splits is None:
            splits = default_num_splits(meta.batch_size, k_cache.shape[2], q.device, meta.max_kv_len)
        return paged_decode(q, k_cache, v_cache, meta.page_table, meta.kv_lens, scale, num_splits=splits,
                            tree_start=meta.tree_start, tree_bits=meta.tree_bits)
