"""What prefill and decode workers share: the engine, the sockets to the controller and
to peers, heartbeats, and the loop that interleaves messages with engine steps."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import torch
import zmq
import zmq.asyncio

from runtime import ipc
from runtime.config import ClusterConfig
from runtime.engine.core import EngineCore
from runtime.env import ENV
from runtime.messages import Deregister, Drain, DrainAck, Heartbeat, Ready, Registered, Shutdown
from runtime.security import CurveKeys, guard_for

log = logging.getLogger("runtime.worker")


def _drain(q: deque) -> list:
    """Pop everything (deque pops are thread-safe against the engine thread's appends)."""
    out = []
    while q:
        out.append(q.popleft())
    return out


def device_label(device: torch.device) -> str:
    """The device as the host names it: "cpu", or "cuda:N" with N the physical GPU index
    (CUDA_VISIBLE_DEVICES renumbers GPUs inside the process), so /health shows placement."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [x.strip() for x in ENV.cuda_visible_devices.split(",") if x.strip()]
    return f"cuda:{visible[index] if index < len(visible) else index}"


class Worker(ipc.Actor):
    role = "worker"

    def __init__(self, cfg: ClusterConfig, worker_id: int, inbox_addr: str, engine_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.id = worker_id
        self.ctx = zmq.asyncio.Context()
        keys = CurveKeys.load(cfg.curve_keys) if cfg.curve_keys else None
        self.guard = guard_for(self.ctx, keys, f"{self.role} worker")
        self.inbox = ipc.pull(self.ctx, inbox_addr, bind=True, guard=self.guard)
        self.controller = ipc.push(self.ctx, cfg.controller_addr, guard=self.guard)
        self._peers: dict[str, ipc.Queue] = {}
        self.core = EngineCore(engine_cfg)
        self.served = 0
        # seconds, drained by heartbeats: prefill write posted -> done; decode reserve -> landed
        self.transfer_latency: deque[float] = deque()
        self.kv_wait: deque[float] = deque()
        self.running = True
        self.loop_time = time.monotonic()  # the loop's last pass (a liveness probe reads it)
        # Drain (SIGTERM of a joined worker): the deadline, and whether the controller has
        # confirmed that nothing more will be routed here.
        self.drain_deadline: float | None = None
        self.drain_acked = False
        self.handlers.update({Shutdown: self.on_shutdown, DrainAck: self.on_drain_ack,
                              Registered: lambda m: None})  # a repeat crossing our repeated Register

    def peer(self, addr: str) -> ipc.Queue:
        q = self._peers.get(addr)
        if q is None:
            q = self._peers[addr] = ipc.push(self.ctx, addr, guard=self.guard)
        return q

    def on_shutdown(self, msg: Shutdown) -> None:
        log.info("%s %d: shutting down (%s)", self.role, self.id, msg.reason)
        self.running = False

    # ---- drain ---------------------------------------------------------------------------
    def begin_drain(self, timeout_s: float) -> None:
        """Finish what runs here (at most timeout_s), then leave. Called from a signal handler."""
        if self.drain_deadline is None:
            log.info("%s %d: draining (at most %.0f s)", self.role, self.id, timeout_s)
            self.drain_deadline = time.monotonic() + timeout_s
            # Without the controller's DrainAck (it is gone too), idle for this long is final.
            self._drain_silent_at = time.monotonic() + self.cfg.dead_after_s
            self._drain_sent = False

    def on_drain_ack(self, msg: DrainAck) -> None:
        self.drain_acked = True

    def idle(self) -> bool:
        """No request of the controller's is in progress here."""
        return not self.core.has_work

    async def _drain_step(self) -> None:
        if not self._drain_sent:
            await self.controller.send(Drain(self.role, self.id, os.getpid()))
            self._drain_sent = True
        now = time.monotonic()
        late = now > self.drain_deadline
        if ((self.drain_acked or now > self._drain_silent_at) and self.idle()) or late:
            if late and not self.idle():
                log.warning("%s %d: drain timed out with requests still running; the controller retries or "
                            "fails them", self.role, self.id)
            await self.controller.send(Deregister(self.role, self.id, os.getpid()))
            self.running = False

    # ---- subclass hooks ------------------------------------------------------------------
    async def after_step(self, outputs: list) -> None:
        raise NotImplementedError

    async def tick(self) -> None:
        """Called every loop iteration: transfer polls, timeouts."""

    def load(self) -> tuple[int, int]:
        """(running, queued) for heartbeats and routing."""
        s = self.core.scheduler
        return len(s.running), len(s.waiting)

    def heartbeat_extra(self) -> dict[str, int]:
        return {"transfer_bytes": 0, "transfer_failures": 0}

    # ---- heartbeats ----------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        """A snapshot of this worker's load; called from the heartbeat thread."""
        pool = self.core.pool
        running, queued = self.load()
        accepts = _drain(self.core.accept_samples)
        latency = _drain(self.transfer_latency)
        drafter = self.core.drafter.name if self.core.drafter is not None else "none"
        return Heartbeat(
            self.role, self.id, os.getpid(), running, queued, self.served,
            pool.num_free + self.core.cache.evictable_pages, pool.total_pages,
            self.core.cache.stats().hit_rate, **self.heartbeat_extra(),
            transfer_latency=latency, kv_wait=_drain(self.kv_wait), drafter=drafter, accept_lengths=accepts,
        )

    def _beat_forever(self, stop: threading.Event) -> None:
        # A thread of its own, so a long engine step (a big prefill on a busy CPU) never
        # looks like death to the controller; a dead or frozen process still stops beating.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if self.guard is not None and self.cfg.controller_addr.startswith("tcp://"):
            self.guard.keys.apply(sock, bind=False)
        sock.connect(self.cfg.controller_addr)
        try:
            while not stop.wait(self.cfg.heartbeat_s):
                try:
                    beat = ipc.encode(self.heartbeat())
                except Exception:  # a snapshot that failed must not silence this worker for good
                    log.exception("%s %d: heartbeat snapshot failed; the next one is tried", self.role, self.id)
                    continue
                sock.send(beat)
        finally:
            sock.close(0)
            ctx.term()

    # ---- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.controller.send(Ready(self.role, self.id, os.getpid(), self.core.pool.total_pages, device_label(self.core.device)))
        stop = threading.Event()
        beat = threading.Thread(target=self._beat_forever, args=(stop,), name="heartbeat", daemon=True)
        beat.start()
        step_delay = float(ENV.test_step_delay or 0)
        try:
            while self.running:
                # Drain every message that is already here, then compute.
                while (msg := await self.inbox.recv_nowait()) is not None:
                    await self.dispatch(msg)
                await self.tick()
                self.loop_time = time.monotonic()
                if self.drain_deadline is not None:
                    await self._drain_step()
                    if not self.running:
                        break
                if self.core.has_work:
                    outputs = self.core.step()
                    await self.after_step(outputs)
                    await asyncio.sleep(step_delay)
                else:
                    msg = await self.inbox.recv_timeout(self.idle_wait())
                    if msg is not None:
                        await self.dispatch(msg)
        finally:
            stop.set()
            beat.join(2 * self.cfg.heartbeat_s)
            self.close()

    def idle_wait(self) -> float:
        return self.cfg.heartbeat_s

    def close(self) -> None:
        # A drained worker's last KVDone / TokenDelta / Deregister still go out; otherwise
        # (runtime up stopping everything) nothing waits for peers that may be gone.
        linger = 1000 if self.drain_deadline is not None else 0
        for q in self._peers.values():
            q.sock.close(linger=linger)
        self.inbox.close()
        self.controller.sock.close(linger=linger)
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()
