"""KV transfer between prefill and decode workers: the interface (base.py), the NIXL
backend, the inline ZMQ backend and an in-process fake."""
from __future__ import annotations

import logging

from runtime.transfer.base import KVReceiver, KVSender, PagedKVMemory, TransferError, TransferState

__all__ = ["KVReceiver", "KVSender", "PagedKVMemory", "TransferError", "TransferState", "make_transfer"]

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


def make_transfer(kind: str, pool: PagedKVMemory, worker_id: int, role: str) -> KVSender | KVReceiver:
    """The sender (role "prefill") or receiver (role "decode") of backend `kind`:
    auto | zmq | nixl | fake. auto takes NIXL when it imports and can register the pool,
    else zmq; both sides of a transfer must end up on the same backend (start() says so
    clearly when they do not)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    prefill = role == "prefill"
    if kind in ("auto", "nixl"):
        try:
            from runtime.transfer.nixl import NixlReceiver, NixlSender

            return NixlSender(pool, worker_id) if prefill else NixlReceiver(pool, worker_id)
        except Exception as e:  # noqa: BLE001 - ImportError, no UCX, registration refused, ...
            if kind == "nixl":
                raise RuntimeError(
                    f"--transfer nixl: NIXL is not usable here ({e}); `pip install nixl`, "
                    "or use --transfer zmq"
                ) from e
            log.info("NIXL unavailable (%s): KV goes inline over ZMQ", e)
    if kind in ("auto", "zmq"):
        from runtime.transfer.zmq_inline import ZmqReceiver, ZmqSender

        return ZmqSender(pool, worker_id) if prefill else ZmqReceiver(pool, worker_id)
    if kind == "fake":
        from runtime.transfer.fake import FakeReceiver, FakeSender

        return FakeSender(pool, worker_id) if prefill else FakeReceiver(pool, worker_id)
    raise ValueError(f"transfer backend must be one of auto, zmq, nixl, fake (got {kind!r})")
