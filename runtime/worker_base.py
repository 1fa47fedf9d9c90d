"""What prefill and decode workers share: the engine, the sockets to the controller and
to peers, heartbeats, and the loop that interleaves messages with engine steps."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from runtime import ipc
from runtime.config import ClusterConfig
from runtime.engine.core import EngineCore
from runtime.messages import Heartbeat, Ready, Shutdown

log = logging.getLogger("runtime.worker")


class Worker(ipc.Actor):
    role = "worker"

    def __init__(self, cfg: ClusterConfig, worker_id: int, inbox_addr: str, engine_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.id = worker_id
        self.ctx = zmq.asyncio.Context()
        self.inbox = ipc.pull(self.ctx, inbox_addr, bind=True)
        self.controller = ipc.push(self.ctx, cfg.controller_addr)
        self._peers: dict[str, ipc.Queue] = {}
        self.core = EngineCore(engine_cfg)
        self.served = 0
        self.transfer_latency: list[float] = []  # seconds, since the last heartbeat
        self.running = True
        self.handlers[Shutdown] = self.on_shutdown

    def peer(self, addr: str) -> ipc.Queue:
        q = self._peers.get(addr)
        if q is None:
            q = self._peers[addr] = ipc.push(self.ctx, addr)
        return q

    def on_shutdown(self, msg: Shutdown) -> None:
        log.info("%s %d: shutting down (%s)", self.role, self.id, msg.reason)
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

    # ---- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        pool = self.core.pool
        await self.controller.send(Ready(self.role, self.id, os.getpid(), pool.total_pages))
        next_beat = 0.0
        try:
            while self.running:
                # Drain every message that is already here, then compute.
                while (msg := await self.inbox.recv_nowait()) is not None:
                    await self.dispatch(msg)
                await self.tick()
                if self.core.has_work:
                    outputs = self.core.step()
                    await self.after_step(outputs)
                    await asyncio.sleep(0)
                else:
                    msg = await self.inbox.recv_timeout(self.idle_wait())
                    if msg is not None:
                        await self.dispatch(msg)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.cfg.heartbeat_s
                    running, queued = self.load()
                    stats = self.core.cache.stats()
                    accepts, self.core.accept_samples = self.core.accept_samples, []
                    latency, self.transfer_latency = self.transfer_latency, []
                    drafter = self.core.drafter.name if self.core.drafter is not None else "none"
                    await self.controller.send(Heartbeat(
                        self.role, self.id, os.getpid(), running, queued, self.served,
                        pool.num_free + self.core.cache.evictable_pages, pool.total_pages,
                        stats.hit_rate, **self.heartbeat_extra(),
                        transfer_latency=latency, drafter=drafter, accept_lengths=accepts,
                    ))
        finally:
            self.close()

    def idle_wait(self) -> float:
        return self.cfg.heartbeat_s

    def close(self) -> None:
        for q in self._peers.values():
            q.close()
        self.inbox.close()
        self.controller.close()
        self.ctx.term()
