"""The paged KV pool: one page-major tensor of fixed-size pages and a free list.

Layout `kv[page, layer, k/v, slot, Hkv, D]`: everything a page holds, for every layer, is
one contiguous block of `page_bytes` bytes. Moving a page between workers is then a
single copy (NIXL: one descriptor per run of pages), not layers*2 small ones. A layer's
K (or V) cache is the strided view `kv[:, layer, 0]`: [pages, page_size, Hkv, D] with a
page stride of layers*2*page_size*Hkv*D elements; attention kernels take strides.

Page 0 is never handed out: padded rows of a batch (and CUDA-graph padding) write their
KV there, so a stray write can never corrupt a live sequence.
"""
from __future__ import annotations

import torch

from runtime.engine.h2d import to_device


class OutOfPages(RuntimeError):
    pass


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (got {num_pages})")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 (got {page_size})")
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.page_size = page_size
        # [pages, layers, 2 (k, v), page_size, Hkv, D]: one allocation, page-major.
        self.kv = torch.zeros(
            num_pages, num_layers, 2, page_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        # Per-layer views, made once (a forward asks for them in every layer): K, V, and both
        # as [pages, page_size, 2, Hkv, D], where a (page, offset) pair indexes a token's K|V.
        self._k = [self.kv[:, layer, 0] for layer in range(num_layers)]
        self._v = [self.kv[:, layer, 1] for layer in range(num_layers)]
        self._kv_by_slot = [self.kv[:, layer].transpose(1, 2) for layer in range(num_layers)]
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._used = bytearray(num_pages)

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def total_pages(self) -> int:
        """Pages that can hold sequences (page 0 is reserved)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (all layers, K and V): the size of `kv[p]`."""
        return self.kv[0].numel() * self.kv.element_size()

    def k_cache(self, layer: int) -> torch.Tensor:  # [pages, page_size, Hkv, D], strided pages
        return self._k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:  # [pages, page_size, Hkv, D], strided pages
        return self._v[layer]

    def store(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor) -> None:
        """Write new tokens' K and V (kv [T, 2, Hkv, D]) of `layer` at (page, offset) `index`:
        one scatter for both (an FP8 pool rounds here)."""
        self._kv_by_slot[layer].index_put_(index, kv.to(self.kv.dtype))

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not (0 < p < self.num_pages) or not self._used[p]:
                raise RuntimeError(f"KV page {p} freed twice or never allocated")
            self._used[p] = 0
        self._free.extend(pages)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def grow_to(self, pages: list[int], tokens: int) -> bool:
        """Extend `pages` in place to cover `tokens` positions; False (pages unchanged) when
        too few pages are free."""
        need = self.pages_for(tokens) - len(pages)
        if need > len(self._free):
            return False
        if need > 0:
            pages += self.alloc(need)
        return True

    def shrink_to(self, pages: list[int], tokens: int) -> None:
        """Free, in place, the pages of `pages` past those covering `tokens` positions."""
        keep = self.pages_for(tokens)
        if len(pages) > keep:
            self.free(pages[keep:])
            del pages[keep:]

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of token slots src[i] (page * page_size + offset) to dst[i] in every
        layer (speculation moves accepted tree nodes' KV into place). Reads happen before
        writes, so the lists may overlap."""
        ps = self.page_size
        s = to_device(src, torch.int64, self.kv.device)
        d = to_device(dst, torch.int64, self.kv.device)
        # kv[page, :, :, slot] is one token's K and V in every layer: one gather, one scatter.
        self.kv[d // ps, :, :, d % ps] = self.kv[s // ps, :, :, s % ps]

    def check_no_leak(self, held: int = 0) -> None:
        """Raise if any page is in use beyond `held` (pages legitimately held, e.g. by a cache)."""
        in_use = self.total_pages - len(self._free)
        if in_use != held:
            raise AssertionError(f"KV pages in use: {in_use}, expected {held}")
