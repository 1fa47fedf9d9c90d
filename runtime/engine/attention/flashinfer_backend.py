"""Attention with flashinfer's paged kernels (NHD layout, K and V passed as a tuple).

Decode batches (one new token per sequence, no custom mask) use
`BatchDecodeWithPagedKVCacheWrapper`; everything else (prefill with or without a cached
prefix, chunked prefill, speculative verification) uses `BatchPrefillWithPagedKVCacheWrapper`
with causal=True, or with the custom mask (ANDed with the causal rule here, because
flashinfer's custom mode replaces the causal mask instead of combining with it).

The caches are strided views of the page-major pool (page stride = a whole page of every
layer). flashinfer's paged kernels (FA2 and decode via `paged_kv_t`'s kv_strides, the SM90
kernels via k/v_page_stride) read the tensors' strides, but need K and V to share them, a
unit stride on head_dim, and a page stride that fits their 32-bit fields; `_check_cache`
refuses anything else rather than let a kernel read the wrong memory.

flashinfer's plan() reads the indptr arrays on the host; they are built from the host
copies of the lengths in the metadata, so planning never waits for the GPU. The page
indices are gathered on the device with sizes known on the host (no sync either).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata, tree_allowed

_DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _host_indptr(lengths: list[int]) -> torch.Tensor:  # int32 [n+1] CPU
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=out[1:])
    return out


def _ragged_rows(sizes_dev: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a ragged array of `total` elements split into rows of `sizes_dev` (int64 [B]
    device), each element's row and its offset within the row, as int64 [total] device.
    `total` is known on the host, so no sync."""
    bsz = sizes_dev.shape[0]
    rows = torch.repeat_interleave(
        torch.arange(bsz, device=sizes_dev.device), sizes_dev, output_size=total
    )
    starts = torch.cumsum(sizes_dev, 0) - sizes_dev
    return rows, torch.arange(total, device=sizes_dev.device) - starts[rows]


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise unless flashinfer can address these [pages, page_size, Hkv, D] caches."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"flashinfer attention needs K and V caches of one shape [pages, page_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            "flashinfer attention needs K and V caches with equal strides and a unit stride on "
            f"head_dim, got {k_cache.stride()} and {v_cache.stride()}"
        )
    if k_cache.stride(0) * k_cache.element_size() >= 2**32:
        raise ValueError(
            f"a KV page of {k_cache.stride(0) * k_cache.element_size()} bytes is too large for flashinfer's "
            "32-bit page stride; use smaller pages or the triton attention backend"
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"flashinfer attention supports float16/bfloat16, not {dtype}; "
            "use the triton or torch attention backend"
        )


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(
        self,
        device: torch.device | str,
        *,
        num_q_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        dtype: torch.dtype | None = None,
        workspace_bytes: int = _DEFAULT_WORKSPACE_BYTES,
        decode_tensor_cores: bool | None = None,
    ) -> None:
        """With the model's head shape and dtype given, plan() runs in prepare(); without
        them, in the first layer's forward(), once per step either way."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"flashinfer attention needs a CUDA device (got {device})")
        if dtype is not None:
            _check_dtype(dtype)
        try:
            import flashinfer
        except Exception as e:  # ImportError, or a broken install failing at import
            raise ImportError(
                f"flashinfer attention needs the flashinfer-python package ({e}); "
                "install it or choose the triton or torch attention backend"
            ) from e
        self._fi = flashinfer
        self._device = device
        # One float workspace for both wrappers: only one of them runs at a time.
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._decoders: dict[bool, Any] = {}
        self._tensor_cores = decode_tensor_cores
        self._shape = (
            (num_q_heads, num_kv_heads, head_dim, dtype)
            if None not in (num_q_heads, num_kv_heads, head_dim, dtype)
            else None
        )
        self._meta: AttentionMetadata | None = None
        self._checked_strides: tuple | None = None
        self._planned: tuple | None = None
        self._wrapper: Any = None

    def _decoder(self, group: int) -> Any:
        # Tensor-core decode pays off once a KV head serves several query heads.
        tc = self._tensor_cores if self._tensor_cores is not None else group >= 4
        if tc not in self._decoders:
            self._decoders[tc] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_tensor_cores=tc
            )
        return self._decoders[tc]

    def prepare(self, meta: AttentionMetadata) -> None:
        ps, device = meta.page_size, meta.kv_lens.device
        if meta.tree_start is not None:  # flashinfer's decode has no masks: a masked prefill
            allowed = tree_allowed(torch.arange(meta.max_kv_len, device=device), meta.tree_start, meta.tree_bits)
            meta = replace(meta, custom_mask=allowed[:, None, :], tree_start=None, tree_bits=None)
        num_pages = [-(-n // ps) for n in meta.kv_lens_cpu]
        self._kv_indptr = _host_indptr(num_pages)  # int32 [B+1] CPU
        self._qo_indptr = _host_indptr(meta.q_lens_cpu)  # int32 [B+1] CPU
        # flashinfer wants 1 <= last_page_len <= page_size.
        self._last_page_len = torch.tensor(
            [n - (p - 1) * ps for n, p in zip(meta.kv_lens_cpu, num_pages)], dtype=torch.int32
        )  # int32 [B] CPU
        # Page ids of all sequences, concatenated: page_table[i, :num_pages[i]] for each i.
        pages_dev = (meta.kv_lens.long() + ps - 1) // ps
        rows, cols = _ragged_rows(pages_dev, int(self._kv_indptr[-1]))
        self._kv_indices = meta.page_table[rows, cols].to(torch.int32)  # int32 [total_pages] device
        self._decode = meta.is_decode and meta.custom_mask is None
        self._mask = None if meta.custom_mask is None else self._flat_mask(meta)
        self._meta = meta
        self._planned = None
        if self._shape is not None:
            hq, hkv, d, dtype = self._shape
            self._plan(hq, hkv, d, dtype, d**-0.5)

    @staticmethod
    def _flat_mask(meta: AttentionMetadata) -> torch.Tensor:
        """flashinfer's mask layout: for each sequence, its [q_len, kv_len] block of the
        (custom AND causal) mask, flattened row-major and concatenated. bool [sum q*kv]."""
        q_lens, kv_lens = meta.q_lens.long(), meta.kv_lens.long()
        sizes = q_lens * kv_lens
        total = sum(q * k for q, k in zip(meta.q_lens_cpu, meta.kv_lens_cpu))
        rows, offs = _ragged_rows(sizes, total)
        kv_row = kv_lens[rows]
        j, p = offs // kv_row, offs % kv_row  # query row within the sequence, key position
        causal = p <= kv_row - q_lens[rows] + j
        return meta.custom_mask[rows, j, p] & causal

    def _plan(self, hq: int, hkv: int, d: int, dtype: torch.dtype, scale: float) -> None:
        meta = self._meta
        key = (hq, hkv, d, dtype, scale)
        if self._decode:
            self._wrapper = self._decoder(hq // hkv)
            self._wrapper.plan(
                self._kv_indptr,
                self._kv_indices,
                self._last_page_len,
                hq,
                hkv,
                d,
                meta.page_size,
                q_data_type=dtype,
                kv_data_type=dtype,
                sm_scale=scale,
            )
        else:
            self._wrapper = self._prefill
            self._wrapper.plan(
                self._qo_indptr,
                self._kv_indptr,
                self._kv_indices,
                self._last_page_len,
                hq,
                hkv,
                d,
                meta.page_size,
                causal=True,
                custom_mask=self._mask,
                q_data_type=dtype,
                kv_data_type=dtype,
                sm_scale=scale,
            )
        self._planned = key

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if self._meta is None:
            raise RuntimeError("FlashInferAttention.forward called before prepare()")
        hq, d = q.shape[1], q.shape[2]
        key = (hq, k_cache.shape[2], d, q.dtype, scale)
        strides = (k_cache.shape, k_cache.stride(), v_cache.shape, v_cache.stride())
        if strides != self._checked_strides:
            _check_cache(k_cache, v_cache)
            self._checked_strides = strides
        if key != self._planned:
            _check_dtype(q.dtype)
            self._plan(*key)
        return self._wrapper.run(q.contiguous(), (k_cache, v_cache))
