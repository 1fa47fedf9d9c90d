"""NIXL backend: the prefill worker WRITEs its pages straight into the decode worker's pool
(UCX: RDMA / CUDA IPC / shared memory) and NIXL delivers a notification carrying the room
once the data has landed. KVDone then carries no payload.

Each worker owns one agent (named "{role}-{worker_id}-{pid}", so a restarted worker is a
new peer) and registers its whole pool tensor once. The receiver's destination() carries
its agent metadata (a few hundred bytes, sent every time so a restarted prefill worker
needs no extra handshake), the pool's base address and page geometry; the sender loads a
peer's metadata once per agent name.

Descriptors: the pool is page-major ([pages, layers, 2, page_size, Hkv, D]), so page p is
one contiguous block of `block_bytes` (every layer's K and V) at base + p * block_bytes. A
run of pages that are consecutive on both sides becomes one descriptor (`merged_rows`): a
transfer posts between 1 and n descriptors, each at least one whole page. Descriptor size
is what NIXL's bandwidth follows (benchmarks/RESULTS.md, 2 x H200 GPU0 -> GPU1: 16 KiB
descriptors 2.1 GiB/s, 512 KiB ones 56 GiB/s).
Agents must live in different processes (DEVICE.md: GPU->GPU within one process is staged
through TCP at <1 GiB/s).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from runtime.transfer.base import (
    KVReceiver,
    KVSender,
    PagedKVMemory,
    TransferError,
    TransferState,
    check_request,
    kv_layout,
)

log = logging.getLogger(__name__)


def _import_nixl() -> tuple[Any, Any]:
    from nixl._api import nixl_agent, nixl_agent_config  # may raise ImportError

    # NIXL logs every agent/backend creation at INFO on stdout; keep worker output clean.
    logging.getLogger("nixl").setLevel(logging.WARNING)
    return nixl_agent, nixl_agent_config


def nixl_available() -> bool:
    try:
        _import_nixl()
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def merged_rows(
    src_pages: list[int], dst_pages: list[int], block_bytes: int, src_base: int, dst_base: int
) -> tuple[np.ndarray, np.ndarray]:
    """(source, destination) descriptor rows, uint64 [k, 2] of (address, length) each: page
    src_pages[i] goes to dst_pages[i], and every maximal run in which both page ids go up
    by one is merged into one row."""
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    starts_run = np.ones(src.size, dtype=bool)
    starts_run[1:] = (np.diff(src) != 1) | (np.diff(dst) != 1)
    first = np.flatnonzero(starts_run)
    lengths = np.diff(np.append(first, src.size)).astype(np.uint64) * np.uint64(block_bytes)
    rows = []
    for base, pages in ((src_base, src), (dst_base, dst)):
        r = np.empty((first.size, 2), dtype=np.uint64)
        r[:, 0] = np.uint64(base) + pages[first].astype(np.uint64) * np.uint64(block_bytes)
        r[:, 1] = lengths
        rows.append(r)
    return rows[0], rows[1]


class _Agent:
    """One NIXL agent with the whole KV pool registered."""

    def __init__(self, pool: PagedKVMemory, role: str, worker_id: int) -> None:
        nixl_agent, nixl_agent_config = _import_nixl()
        kv = pool.kv
        if not kv.is_contiguous():
            raise TransferError("the KV pool tensor must be contiguous to register it with NIXL")
        self.name = f"{role}-{worker_id}-{os.getpid()}"
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=["UCX"]))
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX backend here")
        self.reg = self.agent.register_memory(kv)
        self.mem = "DRAM" if kv.device.type == "cpu" else "VRAM"
        self.dev_id = 0 if kv.device.type == "cpu" else kv.device.index or 0
        self.base = kv.data_ptr()
        self.num_pages = kv.shape[0]
        self.block_bytes = pool.page_bytes  # one whole page: kv[p]

    def descs(self, rows: np.ndarray, dev_id: int, mem: str) -> Any:
        full = np.empty((len(rows), 3), dtype=np.uint64)  # (address, length, device id)
        full[:, :2] = rows
        full[:, 2] = dev_id
        return self.agent.get_xfer_descs(full, mem)

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self.reg)
        except Exception as e:  # noqa: BLE001 - shutdown is best effort
            log.warning("NIXL deregister of %s failed: %s", self.name, e)


class NixlSender(KVSender):
    kind = "nixl"

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        super().__init__(pool, worker_id)
        self._a = _Agent(pool, "prefill", worker_id)
        self._peers: set[str] = set()
        self._rooms: dict[int, list[Any]] = {}  # room -> [state, xfer handle | None, bytes]
        self._zombies: list[Any] = []  # handles NIXL refused to release (still in flight)

    def _peer(self, dest: dict[str, Any]) -> str:
        name = dest["agent"]
        if name not in self._peers:
            loaded = self._a.agent.add_remote_agent(dest["metadata"])
            if isinstance(loaded, bytes):
                loaded = loaded.decode()
            if loaded != name:
                raise TransferError(f"NIXL metadata names agent {loaded!r}, destination says {name!r}")
            self._peers.add(name)
        return name

    def start(self, room: int, src_pages: list[int], dest: dict[str, Any], num_tokens: int) -> bytes:
        self._reap()
        dst_pages = check_request(self.kind, self.pool, src_pages, dest, num_tokens)
        n = len(dst_pages)
        if dest["block_bytes"] != self._a.block_bytes:
            raise TransferError(f"NIXL block sizes differ: {dest['block_bytes']} vs {self._a.block_bytes}")
        try:
            peer = self._peer(dest)
            src_rows, dst_rows = merged_rows(src_pages[:n], dst_pages, self._a.block_bytes, self._a.base, dest["base"])
            local = self._a.descs(src_rows, self._a.dev_id, self._a.mem)
            remote = self._a.descs(dst_rows, dest["dev_id"], dest["mem"])
            handle = self._a.agent.initialize_xfer("WRITE", local, remote, peer, str(room).encode())
        except TransferError:
            raise
        except Exception as e:  # nixlBackendError, nixlNotFoundError, ...: the peer is unusable
            raise TransferError(f"NIXL could not prepare the KV write for room {room}: {e}") from e
        nbytes = n * self._a.block_bytes
        try:
            status = self._a.agent.transfer(handle)
        except Exception as e:  # noqa: BLE001 - same as an ERR status
            status = f"ERR ({e})"
        if status.startswith("ERR"):
            self._drop(handle)
            raise TransferError(f"NIXL refused to post the KV write for room {room}: {status}")
        self._rooms[room] = [TransferState.TRANSFERRING, handle, nbytes]
        if status == "DONE":
            self._finish(room, TransferState.DONE)
        return b""

    def _finish(self, room: int, state: TransferState) -> None:
        entry = self._rooms[room]
        entry[0] = state
        if state is TransferState.DONE:
            self.bytes_sent += entry[2]
        else:
            self.failures += 1
        self._drop(entry[1])
        entry[1] = None

    def poll(self, room: int) -> TransferState:
        entry = self._rooms.get(room)
        if entry is None:
            return TransferState.FAILED
        if entry[0] is TransferState.TRANSFERRING:
            status = self._a.agent.check_xfer_state(entry[1])
            if status == "DONE":
                self._finish(room, TransferState.DONE)
            elif status == "ERR":
                log.error("NIXL KV write for room %d failed", room)
                self._finish(room, TransferState.FAILED)
        return entry[0]

    def release(self, room: int) -> None:
        entry = self._rooms.pop(room, None)
        if entry is not None and entry[1] is not None:
            self._drop(entry[1])  # unfinished: NIXL tries to cancel it

    def _drop(self, handle: Any) -> None:
        try:
            self._a.agent.release_xfer_handle(handle)
        except Exception as e:  # noqa: BLE001 - cannot cancel yet: retry on later calls
            log.warning("NIXL could not release a transfer yet (%s); will retry", e)
            self._zombies.append(handle)

    def _reap(self) -> None:
        zombies, self._zombies = self._zombies, []
        for h in zombies:
            self._drop(h)

    def close(self) -> None:
        for room in list(self._rooms):
            self.release(room)
        self._reap()
        self._a.close()


class NixlReceiver(KVReceiver):
    kind = "nixl"

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        super().__init__(pool, worker_id)
        self._a = _Agent(pool, "decode", worker_id)
        self._metadata = self._a.agent.get_agent_metadata()
        self._static = {
            "backend": self.kind,
            "layout": kv_layout(pool),
            "agent": self._a.name,
            "metadata": self._metadata,
            "base": self._a.base,
            "num_pages": self._a.num_pages,
            "block_bytes": self._a.block_bytes,
            "dev_id": self._a.dev_id,
            "mem": self._a.mem,
        }
        self._rooms: dict[int, list[Any]] = {}  # room -> [state, bytes expected]
        self._page_bytes = self._a.block_bytes

    def destination(self, room: int, dst_pages: list[int]) -> dict[str, Any]:
        for p in dst_pages:
            if not 0 < p < self.pool.num_pages:
                raise TransferError(f"destination page {p} is outside the pool (1..{self.pool.num_pages - 1})")
        self._rooms[room] = [TransferState.BOOTSTRAPPING, len(dst_pages) * self._page_bytes]
        return {**self._static, "pages": list(dst_pages)}

    def _drain(self) -> None:
        for msgs in self._a.agent.get_new_notifs().values():
            for m in msgs:
                try:
                    room = int(m)
                except ValueError:
                    log.warning("ignoring NIXL notification %r", m)
                    continue
                entry = self._rooms.get(room)  # a released room's late notification is dropped
                if entry is not None and not entry[0].finished:
                    entry[0] = TransferState.DONE
                    self.bytes_received += entry[1]

    def complete(self, room: int, payload: bytes, num_tokens: int) -> TransferState:
        entry = self._rooms.get(room)
        if entry is None:
            return TransferState.FAILED
        if payload:
            log.error("room %d: the prefill worker sent an inline payload to a NIXL receiver", room)
            self.failures += 1
            entry[0] = TransferState.FAILED
            return entry[0]
        self._drain()
        if entry[0] is TransferState.BOOTSTRAPPING:
            entry[0] = TransferState.TRANSFERRING  # the sender saw its write complete
        return entry[0]

    def poll(self, room: int) -> TransferState:
        entry = self._rooms.get(room)
        if entry is None:
            return TransferState.FAILED
        if not entry[0].finished:
            self._drain()
        return entry[0]

    def release(self, room: int) -> None:
        self._rooms.pop(room, None)

    def close(self) -> None:
        self._rooms.clear()
        self._a.close()
