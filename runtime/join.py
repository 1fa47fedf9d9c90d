"""`runtime worker`: one prefill or decode worker that joins a controller over tcp://.

It loads its engine, binds its inbox (tcp://, CURVE when keys are given), registers with
the controller (runtime/controller/registry.py), reports Ready and serves as `runtime up`'s
workers do. SIGTERM drains: the controller stops routing here, running requests finish
(at most --drain-timeout), the worker deregisters and exits 0. A refused worker prints why
and exits 1; one that never hears from the controller exits 1 after --register-timeout.
An optional HTTP port serves /livez and /readyz for Kubernetes probes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from runtime.common.gc_heap import freeze_startup_heap
from runtime.config import ClusterConfig, JoinConfig, split_tcp
from runtime.fingerprint import model_fingerprint
from runtime.messages import Refused, Register, Registered
from runtime.transfer.base import kv_layout
from runtime.worker_base import Worker, device_label

log = logging.getLogger("runtime.join")
REGISTER_EVERY_S = 2.0
STUCK_AFTER_S = 300.0  # liveness: the loop may sit in one long engine step, never this long


class JoinRefused(RuntimeError):
    pass


def route_host(controller_url: str) -> str:
    """This host's address on the route to the controller: what peers on that network reach
    (no packet is sent; a UDP connect only picks the source address)."""
    host, port = split_tcp(controller_url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def advertised(bound: str, join: JoinConfig, controller_url: str) -> str:
    """The inbox address peers use: the bound port, on --advertise-host when the bind
    address is a wildcard."""
    host, port = split_tcp(bound)
    if join.advertise_host:
        host = join.advertise_host
    elif host in ("0.0.0.0", "*"):
        host = route_host(controller_url)
    return f"tcp://{host}:{port}"


def registration(w: Worker, cfg: ClusterConfig, join: JoinConfig, addr: str) -> Register:
    transfer = w.sender if join.role == "prefill" else w.receiver
    return Register(
        uuid.uuid4().hex, join.role, addr, os.getpid(), socket.gethostname(), device_label(w.core.device),
        model_fingerprint(cfg.engine, cfg.engine.model), kv_layout(w.core.pool), transfer.kind, w.core.pool.total_pages,
    )


async def register(w: Worker, reg: Register, timeout_s: float) -> int:
    """Send Register until the controller answers; the id it gave, or JoinRefused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await w.controller.send(reg)
        msg = await w.inbox.recv_timeout(REGISTER_EVERY_S)
        if isinstance(msg, Registered):
            return msg.id
        if isinstance(msg, Refused):
            raise JoinRefused(f"the controller refused this {reg.role} worker: {msg.reason}")
        if msg is not None:
            log.warning("unexpected %s before registration; ignored", type(msg).__name__)
    raise JoinRefused(
        f"no answer from the controller at {w.cfg.controller_addr} within {timeout_s:.0f} s: is it running and "
        f"reachable from here, is {reg.addr} reachable from it, and do --curve-keys hold its keys?")


class _Probes(BaseHTTPRequestHandler):
    worker: Worker  # set on the subclass made per server
    state: dict

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        w = self.worker
        if self.path == "/livez":
            ok = time.monotonic() - w.loop_time < STUCK_AFTER_S or not self.state["serving"]
        elif self.path == "/readyz":
            ok = self.state["serving"] and w.drain_deadline is None
        else:
            self.send_error(404)
            return
        body = json.dumps({"ok": ok, "role": w.role, "id": w.id, "serving": self.state["serving"],
                           "draining": w.drain_deadline is not None}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # probes every few seconds: not worth a line
        pass


def start_probes(w: Worker, port: int, state: dict) -> ThreadingHTTPServer:
    handler = type("Probes", (_Probes,), {"worker": w, "state": state})
    server = ThreadingHTTPServer(("0.0.0.0", port), handler)
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server


async def serve(cfg: ClusterConfig, join: JoinConfig) -> int:
    if join.role == "prefill":
        from runtime.prefill.worker import PrefillWorker as W
    else:
        from runtime.decode.worker import DecodeWorker as W
    w = W(cfg, -1, inbox_addr=join.listen)
    freeze_startup_heap(f"{join.role} (joining)")  # the engine is built: keep GC scans off its objects
    state = {"serving": False}
    probes = start_probes(w, join.health_port, state) if join.health_port else None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addr = advertised(w.inbox.addr, join, cfg.controller_url)
    registering = asyncio.create_task(register(w, registration(w, cfg, join, addr), join.register_timeout_s))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    code = None
    if not registering.done():  # a signal before we joined: nothing to drain
        registering.cancel()
        code = 0
    elif isinstance(registering.exception(), JoinRefused):
        log.error("%s", registering.exception())
        code = 1
    if code is not None:
        if probes is not None:
            probes.shutdown()
        w.close()
        return code
    w.id = registering.result()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        loop.add_signal_handler(sig, w.begin_drain, join.drain_timeout_s)
    log.info("%s worker %d joined %s as %s", join.role, w.id, cfg.controller_url, addr)
    state["serving"] = True
    try:
        await w.run()
    finally:
        if probes is not None:
            probes.shutdown()
    return 0


def run_worker(cfg: ClusterConfig, join: JoinConfig) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(serve(cfg, join))
