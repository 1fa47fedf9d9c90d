"""`runtime controller`: the gateway and the controller on this host, listening on tcp:// for
workers that join (runtime/join.py). Its own workers (--prefill N --decode M, 0 allowed)
join the same way, over tcp://, so remote workers can reach them; a local worker that exits
is started again (at most MAX_RESTARTS per RESTART_WINDOW_S), a remote one is its host's to
restart. `ready:` once the gateway is up and every local worker has joined."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque

from runtime.config import ClusterConfig, JoinConfig, split_tcp
from runtime.controller.controller import MAX_RESTARTS, RESTART_WINDOW_S, STARTUP_TIMEOUT_S, Controller
from runtime.controller.process import WorkerProcess
from runtime.launcher import Cluster, StartupError, _http_ok

log = logging.getLogger("runtime.launcher")
LOCAL_DRAIN_S = 3.0  # local workers at the controller's shutdown: the 10 s bound of INTERFACE.md


def cluster_transfer(kind: str) -> str:
    """The KV transfer across hosts: auto is the inline zmq transfer (CURVE-encrypted with the
    rest); NIXL's network path (UCX) only when asked for with --transfer nixl."""
    return "zmq" if kind == "auto" else kind


class ListeningCluster(Cluster):
    def __init__(self, cfg: ClusterConfig, log_level: str = "info", advertise_host: str | None = None) -> None:
        super().__init__(dataclasses.replace(cfg, transfer=cluster_transfer(cfg.transfer)), log_level)
        host, _ = split_tcp(self.cfg.controller_url)
        wildcard = host in ("0.0.0.0", "*")
        if wildcard and not advertise_host and cfg.num_prefill + cfg.num_decode:
            log.warning("--listen %s without --advertise-host: local workers advertise 127.0.0.1, which workers "
                        "on other hosts cannot reach", self.cfg.controller_url)
        listen_host = "0.0.0.0" if wildcard else host
        self.join = {role: JoinConfig(role, listen=f"tcp://{listen_host}:*", advertise_host=advertise_host or
                                      (None if wildcard else host), drain_timeout_s=LOCAL_DRAIN_S)
                     for role in ("prefill", "decode")}
        self.slots: list[tuple[str, WorkerProcess, deque[float]]] = []  # role, process, restart times

    def spawn_local(self, role: str) -> WorkerProcess:
        return WorkerProcess(role, -1, self.cfg, self.log_level, join=self.join[role])

    async def start(self) -> None:
        from runtime.fingerprint import model_fingerprint

        cfg = self.cfg
        fingerprint = model_fingerprint(cfg.engine, cfg.engine.model)
        self.controller = Controller(cfg, self.spawn, fingerprint, cfg.transfer)
        self.gateway = self.spawn("gateway", 0)
        for role, n in (("prefill", cfg.num_prefill), ("decode", cfg.num_decode)):
            self.slots += [(role, self.spawn_local(role), deque()) for _ in range(n)]
        task = asyncio.create_task(self.controller.run())
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while True:
                if task.done():
                    task.result()
                for role, p, _ in self.slots:
                    if p.exitcode() is not None:
                        raise StartupError(f"a local {role} worker exited during startup (code {p.exitcode()}); "
                                           f"see its log above")
                if self.gateway.exitcode() is not None:
                    raise StartupError(f"the gateway exited during startup (code {self.gateway.exitcode()})")
                joined = sum(1 for w in self.controller.workers.values() if w.alive)
                if joined >= len(self.slots) and await asyncio.to_thread(_http_ok, self.url + "/livez"):
                    break
                if time.monotonic() > deadline:
                    raise StartupError(f"not ready after {STARTUP_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.2)
        except BaseException:
            task.cancel()
            raise
        self._task = task

    async def serve_forever(self) -> None:
        while not self._task.done():
            self._supervise(time.monotonic())
            await asyncio.wait({self._task}, timeout=1.0)
        await self._task

    def _supervise(self, now: float) -> None:
        for i, (role, p, times) in enumerate(self.slots):
            if p.exitcode() is None:
                continue
            while times and now - times[0] > RESTART_WINDOW_S:
                times.popleft()
            if len(times) >= MAX_RESTARTS:
                continue
            times.append(now)
            log.warning("local %s worker (pid %d) exited with code %s; starting it again (it joins as a new worker)",
                        role, p.pid, p.exitcode())
            self.slots[i] = (role, self.spawn_local(role), times)

    def stop(self, timeout: float = 8.0) -> None:
        locals_ = [p for _, p, _ in self.slots]
        for p in locals_:
            p.terminate()  # drains for LOCAL_DRAIN_S at most
        deadline = time.monotonic() + timeout
        for p in locals_:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                p.kill()
        super().stop(max(1.0, deadline - time.monotonic()))
