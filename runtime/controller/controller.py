"""The controller: the only place that knows the topology. It starts the workers, routes
each request to a (prefill, decode) pair (colocated, `--prefill 0`: to one decode worker
that does both), watches heartbeats and process exits, retries or fails the requests of a
dead worker, restarts it, and tells the gateway the cluster state."""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import zmq.asyncio

from runtime import ipc
from runtime.config import ClusterConfig
from runtime.controller.process import RemoteProcess, WorkerProcess
from runtime.controller.routing import Load, Router
from runtime.messages import (
    Abort, AbortTask, ClusterStatus, DecodeTask, Generate, GenerateTask, Heartbeat, PrefillTask,
    Ready, RequestError, Streaming, TaskDone,
)
from runtime.security import CurveKeys, guard_for

log = logging.getLogger("runtime.controller")
# A request on a worker that died is sent again at most once (when no token of it reached
# the client). Twice would let one request that kills its worker (an allocation the process
# cannot survive, the host's OOM killer) take down three workers in turn; requests that fail
# inside a worker that lives on (an engine step out of memory: a 503) are never sent again.
MAX_RETRIES = 1
# Restarts of one worker within RESTART_WINDOW_S before the controller stops restarting it:
# a crash loop ends, while a long run that loses a worker now and then keeps healing.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
STARTUP_TIMEOUT_S = 600.0  # a worker's first start (model load, CUDA graphs); the launcher waits this long
RESTART_MIN_S = 60.0  # a restart may take 3x the first start (a cold page cache, a busy host), at least this


def restart_bound_s(first_start_s: float) -> float:
    """How long a restarted worker may take to report ready before it is killed and started
    again: three times its first start (model load), within [RESTART_MIN_S, STARTUP_TIMEOUT_S]."""
    return min(STARTUP_TIMEOUT_S, max(RESTART_MIN_S, 3.0 * first_start_s))


@dataclass
class WorkerState:
    role: str
    id: int
    proc: WorkerProcess | RemoteProcess
    alive: bool = False
    addr: str = ""  # its inbox: where tasks, and its peers' KV handshake, go
    draining: bool = False  # SIGTERM'd joined worker: finishing its requests, routed nothing new
    last_beat: float = 0.0
    beat: Heartbeat | None = None
    load: Load = field(default_factory=lambda: Load(0))
    restarts: int = 0
    ever_ready: bool = False
    device: str = ""  # from Ready: "cpu", "cuda:N"
    spawned_at: float = field(default_factory=time.monotonic)  # of the current process
    first_start_s: float = 0.0  # the first process's spawn -> Ready
    ready_by: float | None = None  # a restarted process not ready by then is killed and restarted
    restart_times: deque[float] = field(default_factory=deque)  # within RESTART_WINDOW_S
    gave_up: bool = False  # MAX_RESTARTS within the window: not restarted until it passes


@dataclass
class Flight:
    gen: Generate
    prefill: int  # -1 when colocated
    decode: int
    room: int  # 0 when colocated (no transfer)
    prefill_done: bool = False  # colocated: True from the start (no prefill worker to track)
    streaming: bool = False
    retries: int = 0


class Controller(ipc.Actor):
    def __init__(self, cfg: ClusterConfig, spawn: "callable", fingerprint: dict | None = None,
                 transfer: str = "zmq") -> None:
        super().__init__()
        self.cfg = cfg
        self.spawn = spawn  # (role, id) -> WorkerProcess
        self.ctx = zmq.asyncio.Context()
        self.guard = guard_for(self.ctx, CurveKeys.load(cfg.curve_keys) if cfg.curve_keys else None, "controller")
        self.inbox = ipc.pull(self.ctx, cfg.controller_bind, bind=True, guard=self.guard)
        self.gateway = ipc.push(self.ctx, cfg.gateway_addr, guard=self.guard)
        self.out: dict[tuple[str, int], ipc.Queue] = {}
        self.workers: dict[tuple[str, int], WorkerState] = {}
        self.flights: dict[str, Flight] = {}
        self.router = Router(cfg.routing, block=cfg.engine.page_size)
        # The workers that prefill prompts, each in its own prefix cache (what the router's
        # prefix index approximates): the prefill workers, or colocated decode workers.
        self.prefill_role = "decode" if cfg.colocated else "prefill"
        self._rooms = itertools.count(1)
        self._seeds = random.Random()
        # Samples gathered from heartbeats since the last ClusterStatus (sent once each).
        self.transfer_latency: list[float] = []
        self.kv_wait: list[float] = []
        self.accept_lengths: dict[str, list[int]] = {}
        self.running = True
        self.handlers.update({
            Generate: self.on_generate, Abort: self.on_abort, Ready: self.on_ready,
            Heartbeat: self.on_heartbeat, TaskDone: self.on_task_done, Streaming: self.on_streaming,
        })
        self.registry = None
        if cfg.distributed:
            from runtime.controller.registry import Registry

            self.registry = Registry(self, fingerprint or {}, transfer)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start_workers(self) -> None:
        for role, n, addr in (("prefill", self.cfg.num_prefill, self.cfg.prefill_addr),
                              ("decode", self.cfg.num_decode, self.cfg.decode_addr)):
            for i in range(n):
                self.out[(role, i)] = ipc.push(self.ctx, addr(i))
                self.workers[(role, i)] = WorkerState(role, i, self.spawn(role, i), load=Load(i), addr=addr(i))

    def all_ready(self) -> bool:
        return all(w.alive for w in self.workers.values())

    def first_exit(self) -> WorkerState | None:
        return next((w for w in self.workers.values() if w.proc.exitcode() is not None), None)

    async def run(self) -> None:
        next_check = 0.0
        while self.running:
            msg = await self.inbox.recv_timeout(self.cfg.heartbeat_s / 2)
            if msg is not None:
                await self.dispatch(msg)
                while (msg := await self.inbox.recv_nowait()) is not None:
                    await self.dispatch(msg)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.cfg.heartbeat_s
                await self.check_health()
                await self.gateway.send(self.status())

    def close(self) -> None:
        for q in self.out.values():
            q.close()
        self.inbox.close()
        self.gateway.close()
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()

    # ---- requests ------------------------------------------------------------------------------
    def _live(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.alive and not w.draining]

    async def on_generate(self, g: Generate) -> None:
        if g.params.get("seed") is None:
            # Prefill samples the first token and decode the rest: both must draw from the
            # same seeded stream to reproduce what one engine would sample.
            g.params["seed"] = self._seeds.getrandbits(63)
        await self._dispatch_flight(g, retries=0)

    async def _dispatch_flight(self, g: Generate, retries: int) -> None:
        if self.cfg.colocated:
            await self._dispatch_colocated(g, retries)
            return
        prefills, decodes = self._live("prefill"), self._live("decode")
        if not prefills or not decodes:
            role = "prefill" if not prefills else "decode"
            await self.gateway.send(RequestError(g.rid, self._no_worker(role), 503))
            return
        p = self.router.pick_prefill(g.prompt_ids, [w.load for w in prefills])
        d = self.router.pick_decode([w.load for w in decodes])
        room = next(self._rooms)
        self.flights[g.rid] = Flight(g, p.id, d.id, room, retries=retries)
        p.inflight += 1
        d.inflight += 1
        paddr, daddr = self.workers[("prefill", p.id)].addr, self.workers[("decode", d.id)].addr
        await self.out[("decode", d.id)].send(DecodeTask(g.rid, room, g.prompt_ids, g.params, p.id, paddr))
        await self.out[("prefill", p.id)].send(PrefillTask(g.rid, room, g.prompt_ids, g.params, d.id, daddr))

    async def _dispatch_colocated(self, g: Generate, retries: int) -> None:
        workers = self._live("decode")
        if not workers:
            await self.gateway.send(RequestError(g.rid, self._no_worker("decode"), 503))
            return
        # The worker prefills too: pick it as a prefill worker is picked (prefix affinity, load).
        w = self.router.pick_prefill(g.prompt_ids, [w.load for w in workers])
        self.flights[g.rid] = Flight(g, -1, w.id, 0, prefill_done=True, retries=retries)
        w.inflight += 1
        await self.out[("decode", w.id)].send(GenerateTask(g.rid, g.prompt_ids, g.params))

    def _no_worker(self, role: str) -> str:
        """The 503 message when no `role` worker is alive: when it is expected back, if known."""
        now = time.monotonic()
        back = [w.ready_by - now for w in self.workers.values()
                if w.role == role and not w.alive and w.ready_by is not None]
        when = f" (a restarted {role} worker is expected ready within {max(0.0, min(back)):.0f} s)" if back else ""
        return f"no live {role} worker{when}; try again shortly"

    async def on_abort(self, a: Abort) -> None:
        f = self.flights.pop(a.rid, None)
        if f is None:
            return
        self._settle(f, prefill=not f.prefill_done, decode=True)
        if not f.prefill_done:
            await self._send("prefill", f.prefill, AbortTask(a.rid))
        await self._send("decode", f.decode, AbortTask(a.rid))

    async def on_task_done(self, t: TaskDone) -> None:
        f = self.flights.get(t.rid)
        if f is None:
            return
        if t.role == "prefill" and t.id == f.prefill and not f.prefill_done:
            f.prefill_done = True
            self._settle(f, prefill=True, decode=False)
        elif t.role == "decode" and t.id == f.decode:
            self.flights.pop(t.rid)
            self._settle(f, prefill=not f.prefill_done, decode=True)

    def _settle(self, f: Flight, prefill: bool, decode: bool) -> None:
        for role, wid, flag in (("prefill", f.prefill, prefill), ("decode", f.decode, decode)):
            w = self.workers.get((role, wid))
            if flag and w is not None:
                w.load.inflight = max(0, w.load.inflight - 1)

    async def on_streaming(self, s: Streaming) -> None:
        f = self.flights.get(s.rid)
        if f is not None:
            f.streaming = True

    async def _send(self, role: str, wid: int, msg: object) -> None:
        w = self.workers.get((role, wid))
        if w is not None and w.alive:
            await self.out[(role, wid)].send(msg)

    # ---- workers ---------------------------------------------------------------------------------
    async def on_ready(self, r: Ready) -> None:
        w = self.workers.get((r.role, r.id))
        if w is None:
            if self.registry is None:
                raise ValueError(f"Ready from unknown worker {r.role} {r.id}")
            log.warning("Ready from %s worker %d (pid %d), which is not registered (it was forgotten); ignored",
                        r.role, r.id, r.pid)
            return
        now = time.monotonic()
        if w.ever_ready:
            log.info("%s worker %d ready again after %.1f s (pid %d, %s; restart %d)",
                     r.role, r.id, now - w.spawned_at, r.pid, r.device, w.restarts)
        else:
            w.first_start_s = now - w.spawned_at
            log.info("%s worker %d ready (pid %d, %s) after %.1f s", r.role, r.id, r.pid, r.device, w.first_start_s)
        w.alive, w.ever_ready, w.last_beat, w.device, w.ready_by = True, True, now, r.device, None
        w.load = Load(r.id, kv_free_pages=r.kv_total_pages, kv_total_pages=r.kv_total_pages)

    async def on_heartbeat(self, h: Heartbeat) -> None:
        w = self.workers.get((h.role, h.id))
        if w is None or not w.alive or h.pid != w.proc.pid:
            return  # a late beat from a process we already declared dead
        w.last_beat, w.beat = time.monotonic(), h
        self.transfer_latency += h.transfer_latency
        self.kv_wait += h.kv_wait
        if h.accept_lengths:
            self.accept_lengths.setdefault(h.drafter, []).extend(h.accept_lengths)
        w.load.running, w.load.queued = h.running, h.queued
        w.load.kv_free_pages, w.load.kv_total_pages = h.kv_free_pages, h.kv_total_pages

    async def check_health(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            exited = w.proc.exitcode() is not None
            silent = w.alive and now - w.last_beat > self.cfg.dead_after_s
            if w.alive and (exited or silent):
                why = f"exited with code {w.proc.exitcode()}" if exited else "stopped sending heartbeats"
                log.error("%s worker %d (pid %d) %s", w.role, w.id, w.proc.pid, why)
                w.proc.kill()
                w.alive = False
                await self.recover(w)
                if self.registry is not None and self.registry.is_joined(w):
                    self.registry.forget(w)  # its host restarts it, as a new worker
                    continue
            if not w.alive and w.ready_by is not None and now > w.ready_by and w.proc.exitcode() is None:
                log.error("%s worker %d (pid %d) is not ready %.0f s after its restart (expected within %.0f s); "
                          "killing it to start it again", w.role, w.id, w.proc.pid, now - w.spawned_at,
                          w.ready_by - w.spawned_at)
                w.proc.kill()
            if not w.alive and w.proc.exitcode() is not None and self._may_restart(w, now):
                self._restart(w, now)
        if self.registry is not None:
            self.registry.sweep(now)

    def _may_restart(self, w: WorkerState, now: float) -> bool:
        # Only workers that once started are restarted: a startup failure is the launcher's
        # to report, not to loop on.
        if not (w.ever_ready and self.cfg.restart_dead and self.running):
            return False
        while w.restart_times and now - w.restart_times[0] > RESTART_WINDOW_S:
            w.restart_times.popleft()
        if len(w.restart_times) < MAX_RESTARTS:
            w.gave_up = False
            return True
        if not w.gave_up:
            w.gave_up, w.ready_by = True, None
            log.error("%s worker %d was restarted %d times in %.0f s; not restarting it for %.0f s (see its log above)",
                      w.role, w.id, MAX_RESTARTS, RESTART_WINDOW_S, RESTART_WINDOW_S - (now - w.restart_times[0]))
        return False

    def _restart(self, w: WorkerState, now: float) -> None:
        w.restarts += 1
        w.restart_times.append(now)
        w.proc = self.spawn(w.role, w.id)
        w.spawned_at = now
        bound = restart_bound_s(w.first_start_s)
        w.ready_by = now + bound
        log.warning("%s worker %d restarted (pid %d, restart %d); expect it ready within %.0f s (model load; its first "
                    "start took %.1f s)", w.role, w.id, w.proc.pid, w.restarts, bound, w.first_start_s)

    async def recover(self, dead: WorkerState) -> None:
        """Requests that touched a dead worker: retry those no token of which reached the
        client, fail the rest."""
        if dead.role == self.prefill_role:
            self.router.index.forget_worker(dead.id)
        dead.load = Load(dead.id)
        for rid, f in list(self.flights.items()):
            hit = (dead.role == "prefill" and f.prefill == dead.id and not f.prefill_done) or (
                dead.role == "decode" and f.decode == dead.id)
            if not hit:
                continue
            self.flights.pop(rid)
            self._settle(f, prefill=not f.prefill_done, decode=True)
            # Free what the surviving side holds for this request.
            if dead.role == "prefill":
                await self._send("decode", f.decode, AbortTask(rid))
            elif not f.prefill_done:
                await self._send("prefill", f.prefill, AbortTask(rid))
            if not f.streaming and f.retries < MAX_RETRIES:
                log.info("retrying %s after %s worker %d died", rid, dead.role, dead.id)
                await self._dispatch_flight(f.gen, f.retries + 1)
            else:
                await self.gateway.send(RequestError(rid, f"the {dead.role} worker serving this request died", 503))

    def status(self) -> ClusterStatus:
        workers, hit_rates = [], []
        used = total = tbytes = tfail = 0
        for w in self.workers.values():
            b = w.beat
            workers.append(dict(
                role=w.role, id=w.id, pid=w.proc.pid, alive=w.alive and not w.draining,
                running=b.running if b else 0, queued=b.queued if b else 0, served=b.served if b else 0,
                inflight=w.load.inflight,  # dispatched by the controller, not yet reported done
                kv_free_pages=b.kv_free_pages if b else 0, kv_total_pages=b.kv_total_pages if b else 0,
                restarts=w.restarts, device=w.device, draining=w.draining,
                host=getattr(w.proc, "host", "local"), addr=w.addr,
            ))
            if b and w.alive:
                used += b.kv_total_pages - b.kv_free_pages
                total += b.kv_total_pages
                if w.role == self.prefill_role:
                    hit_rates.append(b.cache_hit_rate)
                if w.role == "prefill":
                    tbytes += b.transfer_bytes
                    tfail += b.transfer_failures
        metrics = dict(
            prefix_cache_hit_rate=sum(hit_rates) / len(hit_rates) if hit_rates else 0.0,
            kv_used_pages=used, kv_total_pages=total,
            kv_transfer_bytes_total=tbytes, kv_transfer_failures_total=tfail,
            kv_transfer_latency_seconds=self.transfer_latency, kv_wait_seconds=self.kv_wait,
            spec_accept_length=self.accept_lengths,
        )
        self.transfer_latency, self.kv_wait, self.accept_lengths = [], [], {}
        return ClusterStatus(workers, metrics)
