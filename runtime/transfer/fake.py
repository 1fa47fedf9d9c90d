"""In-process fake: a sender and receivers sharing one `FakeFabric` copy pages tensor to
tensor. It behaves like the NIXL backend (no payload; the receiver learns of completion
out of band) and can be told to fail, or to take a number of polls, per room.

    fabric = FakeFabric(latency_polls=2)
    sender, receiver = FakeSender(pool_a, 0, fabric), FakeReceiver(pool_b, 0, fabric)
    fabric.fail_rooms.add(room)     # that room's write reads FAILED on the sender side

Without a fabric argument both use the module's DEFAULT_FABRIC, so make_transfer("fake",
...) pairs up every sender and receiver created in one process.
"""
from __future__ import annotations

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
)


class FakeFabric:
    def __init__(self, latency_polls: int = 0) -> None:
        self.latency_polls = latency_polls  # sender polls that read TRANSFERRING before the copy
        self.fail_rooms: set[int] = set()
        self.receivers: dict[int, FakeReceiver] = {}


DEFAULT_FABRIC = FakeFabric()


class FakeSender(KVSender):
    kind = "fake"

    def __init__(self, pool: PagedKVMemory, worker_id: int, fabric: FakeFabric | None = None) -> None:
        super().__init__(pool, worker_id)
        self.fabric = fabric or DEFAULT_FABRIC
        self._rooms: dict[int, list[Any]] = {}  # room -> [state, polls left, receiver, src, dst]

    def start(self, room: int, src_pages: list[int], dest: dict[str, Any], num_tokens: int) -> bytes:
        dst_pages = check_request(self.kind, self.pool, src_pages, dest, num_tokens)
        receiver = self.fabric.receivers.get(dest["receiver"])
        if receiver is None:
            raise TransferError(f"no fake receiver {dest['receiver']} on this fabric")
        src = list(src_pages[: len(dst_pages)])
        self._rooms[room] = [TransferState.TRANSFERRING, self.fabric.latency_polls, receiver, src, dst_pages]
        return b""

    def poll(self, room: int) -> TransferState:
        entry = self._rooms.get(room)
        if entry is None:
            return TransferState.FAILED
        if entry[0] is TransferState.TRANSFERRING:
            if room in self.fabric.fail_rooms:
                entry[0] = TransferState.FAILED
                self.failures += 1
            elif entry[1] > 0:
                entry[1] -= 1
            else:
                receiver, src, dst = entry[2], entry[3], entry[4]
                # page-major: page p is the one block kv[p]; moved as bytes (CPU has no FP8 index_copy_)
                dkv = receiver.pool.kv.view(torch.uint8)
                skv = self.pool.kv.view(torch.uint8)
                block = skv.index_select(0, page_index(src, skv.device))
                dkv.index_copy_(0, page_index(dst, dkv.device), block.to(dkv.device))
                self.bytes_sent += block.numel() * block.element_size()
                receiver._landed(room, block.numel() * block.element_size())
                entry[0] = TransferState.DONE
        return entry[0]

    def release(self, room: int) -> None:
        self._rooms.pop(room, None)


class FakeReceiver(KVReceiver):
    kind = "fake"

    def __init__(self, pool: PagedKVMemory, worker_id: int, fabric: FakeFabric | None = None) -> None:
        super().__init__(pool, worker_id)
        self.fabric = fabric or DEFAULT_FABRIC
        self.fabric.receivers[worker_id] = self
        self._rooms: dict[int, TransferState] = {}

    def destination(self, room: int, dst_pages: list[int]) -> dict[str, Any]:
        for p in dst_pages:
            if not 0 < p < self.pool.num_pages:
                raise TransferError(f"destination page {p} is outside the pool (1..{self.pool.num_pages - 1})")
        self._rooms[room] = TransferState.BOOTSTRAPPING
        return {"backend": self.kind, "layout": kv_layout(self.pool), "receiver": self.worker_id, "pages": list(dst_pages)}

    def _landed(self, room: int, nbytes: int) -> None:
        if room in self._rooms:  # a released room's late write is not reported
            self._rooms[room] = TransferState.DONE
            self.bytes_received += nbytes

    def complete(self, room: int, payload: bytes, num_tokens: int) -> TransferState:
        state = self._rooms.get(room)
        if state is None:
            return TransferState.FAILED
        if payload:
            self.failures += 1
            self._rooms[room] = TransferState.FAILED
        elif state is TransferState.BOOTSTRAPPING:
            self._rooms[room] = TransferState.TRANSFERRING
        return self._rooms[room]

    def poll(self, room: int) -> TransferState:
        return self._rooms.get(room, TransferState.FAILED)

    def release(self, room: int) -> None:
        self._rooms.pop(room, None)

    def close(self) -> None:
        if self.fabric.receivers.get(self.worker_id) is self:
            del self.fabric.receivers[self.worker_id]
