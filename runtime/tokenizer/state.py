"""The gateway's link to the cluster: PUSH Generate/Abort to the controller, and one reader
task on the gateway's PULL socket that routes TokenDelta/RequestError to the waiting
request's asyncio.Queue and keeps the latest ClusterStatus (for /health and /metrics)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq
import zmq.asyncio

from runtime import ipc
from runtime.config import ClusterConfig
from runtime.messages import Abort, ClusterStatus, Generate, RequestError, TokenDelta, TokenDeltas
from runtime.security import CurveKeys, Guard, guard_for
from runtime.tokenizer.metrics import GatewayMetrics
from runtime.tokenizer.protocol import APIError

log = logging.getLogger("runtime.gateway")


class Ticket:
    """The sequences (prompts x n) one admitted request holds in the decode workers' queues,
    until `release()` (idempotent; Generation.close calls it)."""

    def __init__(self, state: GatewayState, sequences: int) -> None:
        self.state = state
        self.sequences = sequences
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.state.admitted -= self.sequences

    @contextmanager
    def released_on_error(self) -> Iterator[Ticket]:
        """Give the room back if the request fails before a Generation takes the ticket."""
        try:
            yield self
        except BaseException:
            self.release()
            raise


class GatewayState(ipc.Actor):
    """Everything the HTTP handlers share. `start()`/`stop()` run inside the server's event
    loop (the app's lifespan), since zmq.asyncio sockets belong to the loop they run on."""

    def __init__(
        self,
        cfg: ClusterConfig,
        tokenizer: Any,
        served_name: str,
        max_model_len: int,
        vocab_size: int | None = None,
        status_timeout_s: float = 3.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size or len(tokenizer)
        self.status_timeout_s = status_timeout_s  # no ClusterStatus this long: the controller is gone
        self.metrics = GatewayMetrics()
        self.routes: dict[str, asyncio.Queue[TokenDelta | RequestError]] = {}
        self.admitted = 0  # sequences of the requests in flight, from admission to their end
        self.status: ClusterStatus | None = None
        self.status_time = time.monotonic()  # startup counts as a status: a grace period
        self.handlers = {TokenDelta: self._route, TokenDeltas: self._route_all, RequestError: self._route,
                         ClusterStatus: self._on_status}
        self._ctx: zmq.asyncio.Context | None = None
        self._to_controller: ipc.Queue | None = None
        self._from_cluster: ipc.Queue | None = None
        self._reader: asyncio.Task[None] | None = None
        self._guard: Guard | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        addr = self.cfg.gateway_bind
        if addr.startswith("ipc://"):
            os.makedirs(os.path.dirname(addr[len("ipc://"):]), exist_ok=True)
        self._ctx = zmq.asyncio.Context()
        keys = CurveKeys.load(self.cfg.curve_keys) if self.cfg.curve_keys else None
        self._guard = guard_for(self._ctx, keys, "gateway")
        self._from_cluster = ipc.pull(self._ctx, addr, bind=True, guard=self._guard)
        self._to_controller = ipc.push(self._ctx, self.cfg.controller_addr, guard=self._guard)
        self.status_time = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name="gateway-reader")
        log.info("gateway linked: PULL %s, PUSH %s", addr, self.cfg.controller_addr)

    async def stop(self) -> None:
        for rid in list(self.routes):
            self.abort(rid)
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        if self._from_cluster is not None:
            self._from_cluster.close()
        if self._to_controller is not None:
            self._to_controller.sock.close(linger=500)  # the Aborts just sent still go out
        self._from_cluster = self._to_controller = None
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ---- requests ------------------------------------------------------------------------------
    def admit(self, sequences: int) -> Ticket:
        """Room for a request of `sequences` sequences, or a 429 when the requests in flight
        would hold more than `max_queued_requests` per live decode worker. Counted from
        admission (before tokenising) to the end of the request, so a burst is refused before
        it costs tokenisation. An idle gateway admits any request the per-request caps allow,
        so a request larger than the bound is slow, never refused forever."""
        live = sum(1 for w in (self.status.workers if self.status else []) if w.get("role") == "decode" and w.get("alive"))
        limit = self.cfg.max_queued_requests * max(1, live)
        if self.admitted and self.admitted + sequences > limit:
            raise APIError(
                429,
                f"the server is overloaded: {self.admitted} sequences are in flight for {live} decode worker(s), "
                f"at most {self.cfg.max_queued_requests} each (--max-queued-requests); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.admitted += sequences
        return Ticket(self, sequences)

    def open(self, rids: list[str]) -> asyncio.Queue[TokenDelta | RequestError]:
        """One queue receives the messages of all of a request's sub-requests (n, batch)."""
        q: asyncio.Queue[TokenDelta | RequestError] = asyncio.Queue()
        for rid in rids:
            self.routes[rid] = q
        return q

    async def submit(self, rid: str, prompt_ids: list[int], params: dict[str, Any]) -> None:
        assert self._to_controller is not None, "gateway not started"
        await self._to_controller.send(Generate(rid, prompt_ids, params))

    def close(self, rid: str) -> None:
        """Forget a finished sub-request: later messages for it are ignored."""
        self.routes.pop(rid, None)

    def abort(self, rid: str) -> None:
        """Tell the controller to stop `rid` and forget it. Synchronous so it can run in a
        `finally` of a cancelled task (client disconnect)."""
        self.routes.pop(rid, None)
        if self._to_controller is None:
            return

        def failed(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("could not send Abort(%s) to the controller: %s", rid, f.exception())

        # zmq.asyncio: a NOBLOCK send completes (or fails) at once, reporting through its future.
        self._to_controller.sock.send(ipc.encode(Abort(rid)), flags=zmq.NOBLOCK).add_done_callback(failed)

    # ---- cluster state ---------------------------------------------------------------------------
    def controller_alive(self) -> bool:
        return time.monotonic() - self.status_time < self.status_timeout_s

    def health(self) -> tuple[bool, str, list[dict[str, Any]]]:
        """(healthy, why not, workers) from the latest ClusterStatus."""
        workers = list(self.status.workers) if self.status is not None else []
        if self.status is None or not self.controller_alive():
            return False, f"no cluster status from the controller for {self.status_timeout_s:g} s", workers
        dead = [r for r in self.cfg.roles if not any(w.get("role") == r and w.get("alive") for w in workers)]
        if dead:
            return False, f"no live {' or '.join(dead)} worker", workers
        return True, "", workers

    # ---- the reader --------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self._from_cluster is not None
        while True:
            try:
                msg = await self._from_cluster.recv()
                await self.dispatch(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad message must not take the gateway down: log it and keep reading.
                log.exception("gateway: bad message on %s", self.cfg.gateway_addr)

    def _route(self, msg: TokenDelta | RequestError) -> None:
        q = self.routes.get(msg.rid)
        if q is None:
            log.debug("%s for unknown request %s (aborted or finished): ignored", type(msg).__name__, msg.rid)
            return
        q.put_nowait(msg)

    def _route_all(self, msg: TokenDeltas) -> None:
        for delta in msg.deltas:
            self._route(delta)

    def _on_status(self, msg: ClusterStatus) -> None:
        self.status = msg
        self.status_time = time.monotonic()
        self.metrics.update_cluster(msg.workers, msg.metrics or {})
