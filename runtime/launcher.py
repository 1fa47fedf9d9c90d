"""`runtime up`: resolve the model once, start the controller here and the gateway and
workers as child processes, print `ready: URL` when every one is up, and on SIGINT/SIGTERM
stop them all (within 10 s) and remove the socket folder."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

from runtime.config import ClusterConfig
from runtime.controller.controller import STARTUP_TIMEOUT_S, Controller
from runtime.controller.process import WorkerProcess

log = logging.getLogger("runtime.launcher")


class StartupError(RuntimeError):
    pass


def resolve_model(cfg: ClusterConfig) -> ClusterConfig:
    """Download/convert the model once here, so workers never race to do it, and pin the
    served name and context length every process must agree on."""
    from runtime.engine.default_model import default_model_path, is_default_model

    engine = cfg.engine
    path = default_model_path() if is_default_model(engine.model) else engine.model
    if not os.path.exists(path):
        raise StartupError(f"model not found: {path}")
    max_len = engine.max_model_len
    if max_len is None:
        from runtime.engine.weights import load_config_only

        max_len = load_config_only(path).max_position_embeddings
    name = cfg.served_model_name or (
        "SmolLM2-135M-Instruct" if is_default_model(engine.model) else os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    )
    return dataclasses.replace(cfg, engine=dataclasses.replace(engine, model=path, max_model_len=max_len), served_model_name=name)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except Exception:
        return False


class Cluster:
    """Owns every child process; usable from tests as a context manager."""

    def __init__(self, cfg: ClusterConfig, log_level: str = "info") -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="runtime-ipc-")
        self.cfg = dataclasses.replace(resolve_model(cfg), ipc_dir=self.ipc_dir)
        self.log_level = log_level
        self.gateway: WorkerProcess | None = None
        self.controller: Controller | None = None
        self.url = f"http://{self.cfg.host}:{self.cfg.port}"

    def spawn(self, role: str, wid: int) -> WorkerProcess:
        return WorkerProcess(role, wid, self.cfg, self.log_level)

    async def start(self) -> None:
        self.controller = Controller(self.cfg, self.spawn)
        self.gateway = self.spawn("gateway", 0)
        self.controller.start_workers()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        task = asyncio.create_task(self.controller.run())
        try:
            while True:
                if task.done():
                    task.result()
                dead = self.controller.first_exit()
                if dead is not None and not dead.ever_ready:
                    raise StartupError(f"{dead.role} worker {dead.id} exited during startup (code {dead.proc.exitcode()}); see its log above")
                if self.gateway.exitcode() is not None:
                    raise StartupError(f"the gateway exited during startup (code {self.gateway.exitcode()}); see its log above")
                if self.controller.all_ready() and await asyncio.to_thread(_http_ok, self.url + "/health"):
                    break
                if time.monotonic() > deadline:
                    raise StartupError(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.2)
        except BaseException:
            task.cancel()
            raise
        self._task = task

    async def serve_forever(self) -> None:
        await self._task

    def stop(self, timeout: float = 8.0) -> None:
        # Joined workers (RemoteProcess) are not ours to stop.
        procs = [w.proc for w in (self.controller.workers.values() if self.controller else [])
                 if isinstance(w.proc, WorkerProcess)]
        if self.controller is not None:
            self.controller.running = False
        if self.gateway is not None:
            procs.append(self.gateway)
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                p.kill()
        if self.controller is not None:
            self.controller.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


async def _up(cfg: ClusterConfig, log_level: str, advertise_host: str | None = None) -> int:
    if cfg.distributed:
        from runtime.controller.listen import ListeningCluster

        cluster: Cluster = ListeningCluster(cfg, log_level, advertise_host)
    else:
        cluster = Cluster(cfg, log_level)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
        if cfg.distributed:
            print(f"listening: {cfg.controller_bind} (workers join with --controller tcp://HOST:PORT)", flush=True)
        print(f"ready: {cluster.url}", flush=True)
        serving = asyncio.create_task(cluster.serve_forever())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (serving, stopper):
            t.cancel()
        if serving in done and not serving.cancelled() and serving.exception():
            raise serving.exception()
        return 0
    except StartupError as e:
        print(f"runtime up: error: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def run_up(cfg: ClusterConfig, log_level: str = "info", advertise_host: str | None = None) -> int:
    """`runtime up`, or with cfg.controller_url `runtime controller`."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(_up(cfg, log_level, advertise_host))
    except StartupError as e:
        print(f"runtime up: error: {e}", file=sys.stderr)
        return 1


def describe(cfg: ClusterConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))
