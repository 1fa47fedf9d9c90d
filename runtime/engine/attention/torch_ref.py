"""Reference attention in plain torch, with work and memory in proportion to the batch's
tokens. Rows are grouped into calls of similar shape (decode rows by key count, prefill
rows likewise), each padded only to its own longest query and key list; a sequence too
long for one call runs alone, in chunks of query rows over only its own keys. Works on CPU
and GPU; the other backends are tested against it.

One dense [B, max_q, max_kv] batch made a 3,500-token prompt next to 64 decode rows ask
SDPA for 6.4e9 score elements (25 GB in fp32) with an 8-head model; see the budgets below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata, tree_allowed
from runtime.engine.h2d import to_device

_HALF = (torch.bfloat16, torch.float16)

# cuDNN's attention builds an execution plan per new shape (~45 ms each on an H200, measured
# in a profile of EAGLE catch-ups whose key count grows every call); prefill shapes rarely
# repeat, so on CUDA the masked SDPA runs the memory-efficient kernel (or math) instead.
_CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

SCORE_BYTES = 256 << 20  # fp32 scores one call may hold if materialised: n * Hq * max_q * max_kv * 4
KEY_BYTES = 256 << 20  # keys one call gathers (values again): n * max_kv * Hkv * D * itemsize
# A call may pad each row's q * kv up to _PAD_SLACK times its own, or pad anything while it
# stays under _PAD_FLOOR score elements per head: a small batch (64 decode rows of up to 256
# keys) then stays one call per layer, where each call costs fixed overhead on CPU.
_PAD_SLACK = 2
_PAD_FLOOR = 1 << 14


@dataclass
class _Call:
    """n rows padded to [n, max_q, max_kv]: one SDPA call per layer."""

    n: int
    max_q: int
    max_kv: int
    pages: torch.Tensor  # int64 [n * ceil(max_kv / page_size)] device: each row's pages in key order
    t0: int  # the rows' packed tokens are t0 .. t0 + n * max_q in order (when q_index is None)
    q_index: torch.Tensor | None  # int64 [n * max_q] device: packed token of each padded query row
    valid: torch.Tensor | None  # int64 [t] device: the real rows of the padded output (None: all are)
    tokens: torch.Tensor | None  # int64 [t] device: the packed token of each real row (with q_index)
    mask: torch.Tensor | None  # [n, 1, max_q, max_kv] device, 0 or -inf in q's dtype (None when causal)
    causal: bool  # every row is a fresh prompt of max_q == max_kv tokens


@dataclass
class _Chunked:
    """One sequence too long for a call: its keys gathered once per layer, its queries in chunks."""

    row: int
    t0: int
    q_len: int
    kv_len: int
    chunk: int  # query rows per SDPA call
    pages: torch.Tensor  # int64 [ceil(kv_len / page_size)] device


class TorchAttention(AttentionBackend):
    name = "torch"

    def __init__(self, score_bytes: int = SCORE_BYTES, key_bytes: int = KEY_BYTES) -> None:
        self.score_bytes, self.key_bytes = score_bytes, key_bytes
        self._meta: AttentionMetadata | None = None
        self._plan_key: tuple | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        # The budgets depend on the head shape and dtype, which only forward sees: the plan is
        # built by the first layer's forward and reused by the others.
        self._meta, self._plan_key = meta, None

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if self._meta is None:
            raise RuntimeError("TorchAttention.forward called before prepare()")
        hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
        key = (hq, hkv, d, q.dtype)
        if self._plan_key != key:
            self._plan(*key)
            self._plan_key = key
        if self._whole:  # one call over the packed tokens in order: its output is the answer
            return self._run(self._calls[0], q, k_cache, v_cache, scale)
        out = q.new_empty(q.shape)
        for c in self._calls:
            res = self._run(c, q, k_cache, v_cache, scale)
            if c.q_index is None:
                out[c.t0 : c.t0 + res.shape[0]] = res
            else:
                out.index_copy_(0, c.tokens, res)
        for c in self._chunked:
            self._run_chunked(c, q, k_cache, v_cache, scale, out)
        return out

    # ---- the plan: once per forward ------------------------------------------------------
    def _plan(self, hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
        meta = self._meta
        self._dtype = dtype
        itemsize = dtype.itemsize
        q_lens, kv_lens = meta.q_lens_cpu, meta.kv_lens_cpu
        limit = max(1, self.score_bytes // (hq * 4))  # score elements per head in one call
        key_limit = max(1, self.key_bytes // (hkv * d * itemsize))  # gathered key rows in one call
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        self._cu = cu
        self._device = meta.q_lens.device
        self._pos = torch.arange(meta.max_kv_len, device=self._device)  # key positions, shared
        by_keys = sorted(range(meta.batch_size), key=lambda i: (q_lens[i] > 1, -kv_lens[i]))
        self._calls, self._chunked = [], []
        for rows in _group(by_keys, q_lens, kv_lens, limit, key_limit):
            i = rows[0]
            if len(rows) == 1 and q_lens[i] * kv_lens[i] > limit:
                chunk = max(1, limit // kv_lens[i])
                pages = self._pages(meta.page_table[i : i + 1], kv_lens[i])
                self._chunked.append(_Chunked(i, cu[i], q_lens[i], kv_lens[i], chunk, pages))
            else:
                self._calls.append(self._call(sorted(rows)))
        c = self._calls[0] if len(self._calls) == 1 and not self._chunked else None
        self._whole = c is not None and c.q_index is None and c.n * c.max_q == cu[-1]

    def _call(self, rows: list[int]) -> _Call:
        meta, cu, dev = self._meta, self._cu, self._device
        q_lens = [meta.q_lens_cpu[i] for i in rows]
        kv_lens = [meta.kv_lens_cpu[i] for i in rows]
        n, max_q, max_kv = len(rows), max(q_lens), max(kv_lens)
        padded = any(x != max_q for x in q_lens)
        in_order = not padded and all(cu[i + 1] == cu[j] for i, j in zip(rows, rows[1:]))
        q_index = valid = tokens = None
        if not in_order:
            # a padded query row reads the row's first token; its output is dropped
            q_index = to_device([cu[i] + min(j, x - 1) for i, x in zip(rows, q_lens) for j in range(max_q)],
                                torch.int64, dev)
            if padded:
                valid = to_device([r * max_q + j for r, x in enumerate(q_lens) for j in range(x)], torch.int64, dev)
            tokens = q_index if valid is None else q_index[valid]
        # Fresh prompts of one length need no mask: kv_lens_cpu only bounds the device key
        # counts from above (the EAGLE drafter passes hints), but kv == q_len pins them.
        causal = (max_q > 1 and meta.custom_mask is None and meta.tree_start is None
                  and all(q == kv == max_q for q, kv in zip(q_lens, kv_lens)))
        r = None if n == meta.batch_size else to_device(rows, torch.int64, dev)  # None: every row, in order
        mask = None if causal else _additive(self._mask(r, max_q, max_kv), self._dtype)
        return _Call(n, max_q, max_kv, self._pages(_pick(meta.page_table, r), max_kv), cu[rows[0]], q_index, valid,
                     tokens, mask, causal)

    def _mask(self, r: torch.Tensor | None, max_q: int, max_kv: int) -> torch.Tensor:
        """bool [n, 1, max_q, max_kv], from the device key counts (the host ones may be hints)."""
        meta = self._meta
        kv = _pick(meta.kv_lens, r).long()[:, None, None]  # [n, 1, 1]
        j, p = self._pos[:max_q], self._pos[:max_kv]
        if max_q == 1:  # decode rows: every key before kv_len
            mask = p[None, None, :] < kv
        else:
            q = _pick(meta.q_lens, r).long()[:, None, None]
            mask = p[None, None, :] <= kv - q + j[None, :, None]  # key position <= the query's own
            # Padded query rows would see no key and turn to NaN; let them see key 0 (dropped).
            mask[:, :, 0] |= j[None, :] >= q[:, :, 0]
        if meta.custom_mask is not None:
            mask &= _pick(meta.custom_mask, r)[:, :max_q, :max_kv]
        if meta.tree_start is not None:
            mask &= tree_allowed(p, _pick(meta.tree_start, r), _pick(meta.tree_bits, r))[:, None, :]
        return mask[:, None]

    def _pages(self, table: torch.Tensor, num_keys: int) -> torch.Tensor:
        """int64 [n * pages]: the pages of keys 0..num_keys-1 of each row of `table` (int32 [n, W])."""
        cols = torch.arange(-(-num_keys // self._meta.page_size), device=self._device).clamp(max=table.shape[1] - 1)
        return table[:, cols].flatten().long()

    # ---- per layer -----------------------------------------------------------------------
    def _run(self, c: _Call, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """[t, Hq, D]: the call's real query rows, in the order of its rows."""
        if c.q_index is not None:
            qp = q.index_select(0, c.q_index)
        else:
            qp = q if self._whole else q[c.t0 : c.t0 + c.n * c.max_q]
        k, v = _gather(k_cache, c.pages, c.n, c.max_kv, q.dtype), _gather(v_cache, c.pages, c.n, c.max_kv, q.dtype)
        out = _sdpa(qp.view(c.n, c.max_q, *q.shape[1:]), k, v, c.mask, c.causal, scale)
        out = out.reshape(c.n * c.max_q, *q.shape[1:])
        return out if c.valid is None else out.index_select(0, c.valid)

    def _run_chunked(self, c: _Chunked, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     scale: float, out: torch.Tensor) -> None:
        meta, pos = self._meta, self._pos
        k, v = _gather(k_cache, c.pages, 1, c.kv_len, q.dtype), _gather(v_cache, c.pages, 1, c.kv_len, q.dtype)
        plain = meta.custom_mask is None and meta.tree_start is None
        first = meta.kv_lens[c.row].long() - c.q_len  # device: the position of query row 0
        for j0 in range(0, c.q_len, c.chunk):
            j1 = min(c.q_len, j0 + c.chunk)
            end = c.kv_len - c.q_len + j1  # keys rows j0..j1 may reach (from the host bound)
            mask = None
            if not (plain and c.kv_len == c.q_len and j0 == 0):  # a fresh prompt's first chunk is top-left causal
                mask = pos[None, :end] <= (first + j0 + pos[: j1 - j0])[:, None]  # [rows, end]
                if meta.custom_mask is not None:
                    mask = mask & meta.custom_mask[c.row, j0:j1, :end]
                if meta.tree_start is not None:
                    row = slice(c.row, c.row + 1)
                    mask = mask & tree_allowed(pos[:end], meta.tree_start[row], meta.tree_bits[row])
                mask = mask[None, None]
            res = _sdpa(q[c.t0 + j0 : c.t0 + j1][None], k[:, :end], v[:, :end], mask, mask is None, scale)
            out[c.t0 + j0 : c.t0 + j1] = res[0]


def _group(order: list[int], q_lens: list[int], kv_lens: list[int], limit: int, key_limit: int) -> list[list[int]]:
    """Next fit over rows sorted by (q_len > 1, key count descending): a row joins the open
    group while the group padded to [n, max_q, max_kv] stays within `limit` score elements per
    head and `key_limit` gathered keys, and either pads no row's q * kv beyond _PAD_SLACK times
    its own or stays under _PAD_FLOOR in all."""
    groups: list[list[int]] = []
    max_q = max_kv = least = 0  # of the open group; least: its smallest own q * kv
    for i in order:
        q, kv = q_lens[i], kv_lens[i]
        if groups and (q > 1) == (max_q > 1):
            n, mq = len(groups[-1]) + 1, max(max_q, q)
            padded = n * mq * max_kv
            if padded <= limit and n * max_kv <= key_limit and (
                    mq * max_kv <= _PAD_SLACK * min(least, q * kv) or padded <= _PAD_FLOOR):
                groups[-1].append(i)
                max_q, least = mq, min(least, q * kv)
                continue
        groups.append([i])
        max_q, max_kv, least = q, kv, q * kv
    return groups


def _pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows' part of a [B, ...] tensor (None: every row)."""
    return t if rows is None else t.index_select(0, rows)


def _gather(cache: torch.Tensor, pages: torch.Tensor, n: int, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, num_keys, Hkv, D] in `dtype`: whole pages copied (a page is contiguous in the cache),
    then trimmed; an FP8 cache is widened to the queries' dtype here."""
    keys = cache.index_select(0, pages).view(n, -1, *cache.shape[2:])[:, :num_keys]
    return keys if keys.dtype == dtype else keys.to(dtype)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as SDPA turns it into an additive one (0 where True, -inf where False),
    once per forward instead of in every layer's call."""
    return torch.where(mask.logical_not(), float("-inf"), torch.scalar_tensor(0.0, dtype=dtype, device=mask.device))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """q [n, q, Hq, D], k/v [n, kv, Hkv, D] -> [n, q, Hq, D]."""
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA):
            return _sdpa_call(q, k, v, mask, causal, scale)
    return _sdpa_call(q, k, v, mask, causal, scale)


def _sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float) -> torch.Tensor:
    n, q_len, hq, d = q.shape
    hkv = k.shape[2]
    if q_len == 1 and hq != hkv and not causal and q.dtype in _HALF and not q.is_cuda:
        # Decode rows on the CPU, grouped-query heads: the query heads that share a key head
        # become that head's query rows ([n, Hkv, Hq / Hkv, D]), one SDPA without enable_gqa.
        # The same per-row arithmetic (the same result within rounding order), but torch's
        # CPU flash kernel runs half precision at one query row per head 4-8x slower (2-core
        # AMD EPYC, torch 2.13, SmolLM2's 9/3 heads: batch 16 x 1,024 keys 6.0 -> 0.7 ms a
        # layer; fp32 is not slow and keeps the call below). The mask [n, 1, 1, kv] broadcasts.
        out = F.scaled_dot_product_attention(
            q.reshape(n, hkv, hq // hkv, d), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
        return out.reshape(n, 1, hq, d)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
        scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
