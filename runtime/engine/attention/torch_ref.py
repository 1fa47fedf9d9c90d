"""Reference attention in plain torch: gathers each sequence's pages into a padded batch
and runs one scaled-dot-product attention per layer. Works on CPU and GPU; the other
backends are tested against it."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata, tree_allowed


# cuDNN's attention builds an execution plan per new shape (~45 ms each on an H200, measured
# in a profile of EAGLE catch-ups whose key count grows every call); prefill shapes rarely
# repeat, so on CUDA the masked SDPA runs the memory-efficient kernel (or math) instead.
_CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.q_lens.device
        bsz, max_q, max_kv, ps = meta.batch_size, meta.max_q_len, meta.max_kv_len, meta.page_size
        q_lens, kv_lens = meta.q_lens.long(), meta.kv_lens.long()
        # Row j of padded sequence i holds packed token cu_q_lens[i] + j (when j < q_len).
        j = torch.arange(max_q, device=device)
        q_valid = j[None, :] < q_lens[:, None]  # [B, max_q]
        self._q_index = (meta.cu_q_lens[:-1].long()[:, None] + j[None, :])[q_valid]  # [T]
        self._q_valid = q_valid
        # The pages holding key positions 0..max_kv-1 of each sequence, gathered whole: a page
        # is contiguous within the (page-strided) cache, so this copies blocks, not rows.
        p = torch.arange(max_kv, device=device)
        self._num_pages = -(-max_kv // ps)
        cols = torch.arange(self._num_pages, device=device).clamp(max=meta.page_table.shape[1] - 1)
        self._kv_pages = meta.page_table.long()[:, cols].flatten()  # int64 [B * num_pages]
        self._max_kv = max_kv
        q_pos = kv_lens[:, None] - q_lens[:, None] + j[None, :]  # [B, max_q]
        mask = (p[None, None, :] <= q_pos[:, :, None]) & (p[None, None, :] < kv_lens[:, None, None])
        if meta.custom_mask is not None:
            mask &= meta.custom_mask[:, :max_q, :max_kv]
        if meta.tree_start is not None:
            mask &= tree_allowed(p, meta.tree_start, meta.tree_bits)[:, None, :]
        # Padded query rows would see no key and turn to NaN; let them see key 0 (discarded).
        mask[:, :, 0] |= ~q_valid
        self._mask = mask[:, None]  # [B, 1, max_q, max_kv]
        self._shape = (bsz, max_q)

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        bsz, max_q = self._shape
        hq, d = q.shape[1], q.shape[2]
        hkv = k_cache.shape[2]
        if max_q == 1:  # decode: one row per sequence, no padding to scatter
            qp = q.view(bsz, 1, hq, d)
        else:
            qp = q.new_zeros(bsz, max_q, hq, d)
            qp[self._q_valid] = q
        k, v = self._gather(k_cache), self._gather(v_cache)  # [B, max_kv, Hkv, D]
        with sdpa_kernel(_CUDA_SDPA) if q.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self._mask, scale=scale,
                enable_gqa=hkv != hq,
            )  # [B, Hq, max_q, D]
        out = out.transpose(1, 2)
        return out.reshape(bsz, hq, d) if max_q == 1 else out[self._q_valid]

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:  # [B, max_kv, Hkv, D]
        bsz = self._shape[0]
        pages = cache.index_select(0, self._kv_pages)  # [B * num_pages, page_size, Hkv, D]
        return pages.view(bsz, -1, *cache.shape[2:])[:, : self._max_kv]
