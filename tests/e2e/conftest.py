"""Start `runtime up` as a real process tree and always tear it down (process group)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from runtime import Engine
from runtime.controller.process import die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], timeout: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # fp32: outputs are compared with the fp32 reference engine (dtype auto is bf16 on
        # CPUs with AVX-512 BF16); a test's own --dtype comes later and wins.
        cmd = [sys.executable, "-m", "runtime.cli", "up", "--port", str(self.port), "--device", "cpu",
               "--dtype", "float32", *args]
        # Own process group: teardown kills the launcher and every worker, even on failure; and
        # a pytest killed before its teardown (a CI timeout) takes the launcher with it.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("ready: "):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if not any(line.startswith("ready: ") for line in self.lines) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("runtime up did not become ready:\n" + "".join(self.lines[-60:]))

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def wait_for(self, pred, timeout: float = 30.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if pred(h):
                return h
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last /health: {h}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(12)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def start_server() -> Iterator:
    servers: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(list(args))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str) -> Iterator[Engine]:
    """The single engine every cluster configuration must match (tiny model, fp32, CPU)."""
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    yield engine
    engine.shutdown()
