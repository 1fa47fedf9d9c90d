"""The KV transfer seam: a prefill worker's `KVSender` writes the KV pages of a prompt into
the pages a decode worker's `KVReceiver` reserved for it.

Handshake (DESIGN.md steps 3-4), driven by the workers:

    decode:  dest = receiver.destination(room, dst_pages)   -> KVDestination.transfer
    prefill: payload = sender.start(room, src_pages, dest, num_tokens)
             sender.poll(room) until DONE | FAILED            -> KVDone(payload=payload)
    decode:  receiver.complete(room, payload, num_tokens), then receiver.poll(room)
             until DONE | FAILED
    both:    release(room) once finished, failed or timed out (safe in any state)

Timeouts belong to the workers (ClusterConfig.transfer_timeout_s); backends report only
what they know. A room unknown to a backend (never started, or released) reads FAILED and
nothing is written for it, so a late KVDone can never scribble on reused pages.
"""
from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch


class PagedKVMemory(Protocol):
    """What a transfer reads of the worker's KV memory: the registered tensor and its page
    geometry. The engine's KVPool satisfies it structurally; transfer never needs its class."""

    @property
    def kv(self) -> torch.Tensor:  # page-major [pages, layers, 2 (k, v), page_size, Hkv, D]: page p is kv[p]
        ...

    @property
    def page_size(self) -> int:  # token slots per page
        ...

    @property
    def num_pages(self) -> int:  # pages in kv, page 0 included (never handed out)
        ...

    @property
    def page_bytes(self) -> int:  # bytes of one page, kv[p]
        ...


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # receiver: destination sent, sender not heard from yet
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class TransferError(RuntimeError):
    """A transfer that cannot start: mismatched backends or KV layouts, bad page lists."""


def kv_layout(pool: PagedKVMemory) -> dict[str, Any]:
    """What both sides must agree on for a page copy to be meaningful."""
    _, layers, _, page_size, heads, head_dim = pool.kv.shape  # page-major: page p is kv[p]
    return {
        "num_layers": layers,
        "page_size": page_size,
        "num_kv_heads": heads,
        "head_dim": head_dim,
        "dtype": str(pool.kv.dtype).removeprefix("torch."),
    }


def pages_needed(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


def check_request(
    backend: str, pool: PagedKVMemory, src_pages: list[int], dest: dict[str, Any], num_tokens: int
) -> list[int]:
    """Validate a sender's start() arguments against `dest`; return the destination pages
    that carry the first `num_tokens` tokens (one per source page, in order)."""
    got = dest.get("backend")
    if got != backend:
        raise TransferError(
            f"the decode worker uses the {got!r} KV transfer backend but this prefill worker uses "
            f"{backend!r}: start all workers with the same --transfer"
        )
    mine = kv_layout(pool)
    if dest.get("layout") != mine:
        raise TransferError(f"KV layouts differ: decode {dest.get('layout')}, prefill {mine}")
    dst_pages = list(dest["pages"])
    if len(src_pages) != len(dst_pages):
        raise TransferError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    n = pages_needed(num_tokens, pool.page_size)
    if not 0 < num_tokens <= len(src_pages) * pool.page_size:
        raise TransferError(f"{num_tokens} tokens do not fit {len(src_pages)} pages of {pool.page_size}")
    for p in src_pages[:n]:
        if not 0 < p < pool.num_pages:
            raise TransferError(f"source page {p} is outside the pool (1..{pool.num_pages - 1})")
    return dst_pages[:n]


def page_index(pages: list[int], device: torch.device) -> torch.Tensor:  # int64 [n] on device
    return torch.tensor(pages, dtype=torch.int64, device=device)


class KVSender(ABC):
    """Prefill side, one per worker."""

    kind: str = ""

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.bytes_sent = 0
        self.failures = 0

    @abstractmethod
    def start(
        self, room: int, src_pages: list[int], dest: dict[str, Any], num_tokens: int
    ) -> bytes | memoryview:
        """Begin moving the first `num_tokens` tokens of `src_pages` to `dest` (the receiver's
        destination() dict, which holds the destination pages). Returns the inline payload for
        KVDone.payload: bytes-like, owning its memory (b"" when the data moves out of band).
        Raises TransferError when the transfer cannot start; the room is then not tracked."""

    @abstractmethod
    def poll(self, room: int) -> TransferState:
        """Non-blocking. DONE once the data is on its way for good (NIXL: the remote write
        completed; zmq: the payload was produced). Unknown rooms read FAILED."""

    @abstractmethod
    def release(self, room: int) -> None:
        """Forget the room, cancelling an unfinished transfer where the backend can. Safe in
        any state, and for unknown rooms."""

    def close(self) -> None:
        """Free backend resources (worker shutdown)."""


class KVReceiver(ABC):
    """Decode side, one per worker."""

    kind: str = ""

    def __init__(self, pool: PagedKVMemory, worker_id: int) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.bytes_received = 0
        self.failures = 0

    @abstractmethod
    def destination(self, room: int, dst_pages: list[int]) -> dict[str, Any]:
        """Start tracking `room` (BOOTSTRAPPING) and return the KVDestination.transfer dict:
        msgpack-safe, holds "backend", "layout", "pages" and the backend's addressing."""

    @abstractmethod
    def complete(self, room: int, payload: bytes, num_tokens: int) -> TransferState:
        """On KVDone(ok=True): zmq scatters `payload` into the pages (DONE, or FAILED when it
        does not match); out-of-band backends return DONE if the data has landed, else
        TRANSFERRING (keep polling). Unknown rooms read FAILED and nothing is written."""

    @abstractmethod
    def poll(self, room: int) -> TransferState:
        """Non-blocking current state; unknown rooms read FAILED."""

    @abstractmethod
    def release(self, room: int) -> None:
        """Forget the room. Safe in any state, and for unknown rooms."""

    def close(self) -> None:
        """Free backend resources (worker shutdown)."""
