"""The always-available backend: the KV rides inline in KVDone.payload over the workers'
ZMQ link. One gather on the prefill device, one copy to host; on the decode side one copy
to the device and one scatter. Bit-exact for every dtype (bytes, never values, move).

Payload layout: the first `num_tokens` token slots of the pages, as raw bytes in the pool's
dtype: the pages filled completely, whole ([full, layers, 2, page_size, Hkv, D], each one
block of the page-major pool), then the first `rem` slots of the last, partly filled page
([layers, 2, rem, Hkv, D]); num_tokens = full * page_size + rem.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from runtime.transfer.base import (
    KVReceiver,
    KVSender,
    PagedKVMemory,
    TransferError,
    TransferState,
    check_request,
    kv_layout,
    page_index,
    pages_needed,
)

log = logging.getLogger(__name__)


def _split(pool: PagedKVMemory, num_tokens: int) -> tuple[int, int, int]:
    """(full pages, slots of the partial last page, elements of one whole page)."""
    full, rem = divmod(num_tokens, pool.page_size)
    return full, rem, pool.kv[0].numel()


def gather_tokens(pool: PagedKVMemory, pages: list[int], num_tokens: int) -> torch.Tensor:
    """The payload of the first num_tokens slots of `pages`, flat in the pool's dtype on its
    device: one gather of whole pages, one copy of the partial page's slots."""
    kv = pool.kv
    full, rem, page_numel = _split(pool, num_tokens)
    _, L, _, _, H, D = kv.shape
    out = kv.new_empty(full * page_numel + L * 2 * rem * H * D)
    if full:
        torch.index_select(kv, 0, page_index(pages[:full], kv.device), out=out[: full * page_numel].view(full, *kv.shape[1:]))
    if rem:
        out[full * page_numel :].view(L, 2, rem, H, D).copy_(kv[pages[full], :, :, :rem])
    return out


def scatter_tokens(pool: PagedKVMemory, pages: list[int], data: torch.Tensor, num_tokens: int) -> None:
    """Inverse of gather_tokens: the flat payload `data` into pages' first num_tokens slots."""
    kv = pool.kv
    full, rem, page_numel = _split(pool, num_tokens)
    _, L, _, _, H, D = kv.shape
    data = data.to(kv.device)
    if kv.element_size() == 1:  # FP8: CPU index_copy_ has no float8 kernel; the bytes are the same
        kv, data = kv.view(torch.uint8), data.view(torch.uint8)
    if full:
        kv.index_copy_(0, page_index(pages[:full], kv.device), data[: full * page_numel].view(full, *kv.shape[1:]))
    if rem:
        kv[pages[full], :, :, :rem] = data[full * page_numel :].view(L, 2, rem, H, D)


class ZmqSender(KVSender):
    kind = "zmq"

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        super().__init__(pool, worker_id)
        self._rooms: dict[int, TransferState] = {}

    def start(self, room: int, src_pages: list[int], dest: dict[str, Any], num_tokens: int) -> memoryview:
        check_request(self.kind, self.pool, src_pages, dest, num_tokens)
        n = pages_needed(num_tokens, self.pool.page_size)
        data = gather_tokens(self.pool, src_pages[:n], num_tokens)
        # A read-only view of the freshly gathered (host) tensor, which it keeps alive: no
        # extra copy (msgpack packs any bytes-like object). uint8 because numpy has no bf16.
        payload = data.view(torch.uint8).reshape(-1).cpu().numpy().data.toreadonly()
        self.bytes_sent += len(payload)
        self._rooms[room] = TransferState.DONE
        return payload

    def poll(self, room: int) -> TransferState:
        return self._rooms.get(room, TransferState.FAILED)

    def release(self, room: int) -> None:
        self._rooms.pop(room, None)


class ZmqReceiver(KVReceiver):
    kind = "zmq"

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        super().__init__(pool, worker_id)
        self._layout = kv_layout(pool)
        self._rooms: dict[int, tuple[list[int], TransferState]] = {}

    def destination(self, room: int, dst_pages: list[int]) -> dict[str, Any]:
        for p in dst_pages:
            if not 0 < p < self.pool.num_pages:
                raise TransferError(f"destination page {p} is outside the pool (1..{self.pool.num_pages - 1})")
        self._rooms[room] = (list(dst_pages), TransferState.BOOTSTRAPPING)
        return {"backend": self.kind, "layout": self._layout, "pages": list(dst_pages)}

    def complete(self, room: int, payload: bytes, num_tokens: int) -> TransferState:
        entry = self._rooms.get(room)
        if entry is None:
            return TransferState.FAILED
        pages, state = entry
        if state.finished:
            return state
        kv = self.pool.kv
        _, L, _, ps, H, D = kv.shape
        expect = L * 2 * num_tokens * H * D * kv.element_size()
        n = pages_needed(num_tokens, ps)
        if len(payload) != expect or not 0 < n <= len(pages):
            log.error(
                "room %d: KV payload of %d bytes for %d tokens into %d pages, expected %d bytes",
                room, len(payload), num_tokens, len(pages), expect,
            )
            self.failures += 1
            state = TransferState.FAILED
        else:
            with warnings.catch_warnings():  # read-only bytes: we only read from it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(payload, dtype=torch.uint8)
            scatter_tokens(self.pool, pages[:n], raw.view(kv.dtype), num_tokens)
            self.bytes_received += len(payload)
            state = TransferState.DONE
        self._rooms[room] = (pages, state)
        return state

    def poll(self, room: int) -> TransferState:
        entry = self._rooms.get(room)
        return TransferState.FAILED if entry is None else entry[1]

    def release(self, room: int) -> None:
        self._rooms.pop(room, None)
