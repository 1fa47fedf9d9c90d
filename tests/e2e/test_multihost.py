"""Several hosts on one machine (network namespaces, tests/e2e/netns.py): `runtime controller`
in one, two prefill and two decode `runtime worker`s in others, only tcp:// with CURVE
between them. Greedy outputs equal the single engine; peers without the cluster's keys are
refused and logged; a killed worker is routed around and one joining later is used; a
SIGTERM'd worker finishes its running request, then leaves; a worker of another model
configuration is refused."""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from runtime import Engine, SamplingParams
from runtime.security import create_keys
from tests.e2e.netns import Hosts, Proc, netns_unavailable
from tests.e2e.test_cluster import MODEL, assert_greedy_equals_engine

CONTROLLER_PORT, HTTP_PORT, WORKER_PORT = 29500, 8000, 29600
ENGINE = ["--device", "cpu", "--dtype", "float32", "--page-size", "4", "--kv-cache-tokens", "2048", "--max-model-len", "256"]

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(bool(_why), reason=f"multi-host test: {_why}")


class NetCluster:
    def __init__(self, hosts: Hosts, model: str, keys: str) -> None:
        self.hosts, self.model, self.keys = hosts, model, keys
        self.url = f"http://{hosts.host0_ip}:{HTTP_PORT}"
        self.controller_url = f"tcp://{hosts.ips[0]}:{CONTROLLER_PORT}"
        self.workers: dict[str, Proc] = {}

    def start_controller(self) -> Proc:
        args = [sys.executable, "-m", "runtime.cli", "controller", "--listen", f"tcp://0.0.0.0:{CONTROLLER_PORT}",
                "--advertise-host", self.hosts.ips[0], "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                "--curve-keys", self.keys, "--model", self.model, "--served-model-name", MODEL, *ENGINE]
        self.controller = self.hosts.start(0, args, "controller")
        return self.controller

    def start_worker(self, host: int, role: str, name: str, *extra: str, keys: str | None = None) -> Proc:
        args = [sys.executable, "-m", "runtime.cli", "worker", "--role", role, "--controller", self.controller_url,
                "--listen", f"tcp://0.0.0.0:{WORKER_PORT}", "--curve-keys", keys or self.keys, "--model", self.model,
                *ENGINE, *extra]
        # Decode steps slowed a little, so a tiny model's request is still running when a
        # heartbeat (every 0.5 s) reports it: the drain test must find which worker holds it.
        env = {"RUNTIME_TEST_STEP_DELAY": "0.02"} if role == "decode" else None
        self.workers[name] = p = self.hosts.start(host, args, name, env)
        return p

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())
        except OSError:
            return {"status": "down", "workers": []}

    def wait_for(self, pred, timeout: float, what: str) -> dict:
        deadline, h = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            h = self.health()
            if pred(h):
                return h
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last /health: {h}\ncontroller log:\n"
                             + self.controller.text()[-3000:])


def alive(h: dict, role: str) -> list[dict]:
    return [w for w in h["workers"] if w["role"] == role and w["alive"]]


@pytest.fixture(scope="module")
def net(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    work = tmp_path_factory.mktemp("multihost")
    keys = str(work / "keys")
    create_keys(keys)
    hosts = Hosts(6, work)  # 0 controller, 1-2 prefill, 3-4 decode, 5 spare / intruder
    try:
        c = NetCluster(hosts, tiny_model_dir, keys)
        c.start_controller()
        for host, role, name in ((1, "prefill", "p1"), (2, "prefill", "p2"), (3, "decode", "d3"), (4, "decode", "d4")):
            c.start_worker(host, role, name)
        c.controller.wait_for("ready: ", 120)
        c.wait_for(lambda h: len(alive(h, "prefill")) == 2 and len(alive(h, "decode")) == 2, 120, "four workers")
        yield c
    finally:
        hosts.close()


def client(c: NetCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_greedy_over_tcp_equals_single_engine(net: NetCluster, reference: Engine) -> None:
    h = net.health()
    # Every worker advertises its own host's address: the links really cross namespaces.
    assert sorted(w["addr"] for w in h["workers"]) == sorted(f"tcp://{ip}:{WORKER_PORT}" for ip in net.hosts.ips[1:5])
    assert_greedy_equals_engine(net, reference)


def settled_served(net: NetCluster) -> int:
    """Requests served over all workers, once heartbeats (every 0.5 s) have caught up."""
    last = -1
    while True:
        now = sum(w["served"] for w in net.health()["workers"])
        if now == last:
            return now
        last = now
        time.sleep(1.5)


def test_peer_without_keys_is_refused(net: NetCluster, tmp_path: Path) -> None:
    # Right server key, a client key the cluster never issued: ZAP refuses it, by address.
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    for f in ("server.key", "server.key_secret"):
        (intruder / f).write_bytes((Path(net.keys) / f).read_bytes())
    create_keys(str(intruder))
    script = (
        "import sys, time, zmq\n"
        "from runtime import ipc\nfrom runtime.messages import Generate\nfrom runtime.security import CurveKeys\n"
        "ctx = zmq.Context()\n"
        "for keys in (CurveKeys.load(sys.argv[1]), None):\n"  # an unknown client key, then no CURVE at all
        "    s = ctx.socket(zmq.PUSH)\n"
        "    if keys: keys.apply(s, bind=False)\n"
        "    s.connect(sys.argv[2]); s.send(ipc.encode(Generate('intruder', [1, 2, 3], {})))\n"
        "    time.sleep(1.0); s.close(0)\n"
    )
    served = settled_served(net)
    p = net.hosts.start(5, [sys.executable, "-c", script, str(intruder), net.controller_url], "intruder")
    assert p.proc.wait(30) == 0, p.text()
    net.controller.wait_for(f"refused a peer at {net.hosts.ips[5]}", 10)
    # Which end notices a peer without CURVE first is a race: a mechanism mismatch, or a hang-up.
    deadline = time.monotonic() + 10
    while not any(s in net.controller.text() for s in ("the peer does not use CURVE", "hung up during the CURVE")):
        assert time.monotonic() < deadline, net.controller.text()[-2000:]
        time.sleep(0.2)
    assert len(net.health()["workers"]) == 4 and settled_served(net) == served  # its Generate never ran


def test_killed_worker_routed_around_and_new_one_used(net: NetCluster, reference: Engine) -> None:
    net.workers["d3"].signal(signal.SIGKILL)
    net.wait_for(lambda h: len(alive(h, "decode")) == 1 and len(h["workers"]) == 3, 20, "the killed worker gone")
    assert_greedy_equals_engine(net, reference)  # all on the survivor
    # One joins on another host; one of another configuration is refused, with the reason.
    net.start_worker(5, "decode", "d5")
    bad = net.start_worker(3, "decode", "bad", "--page-size", "8")
    h = net.wait_for(lambda h: len(alive(h, "decode")) == 2, 60, "the new decode worker")
    new = next(w for w in alive(h, "decode") if w["addr"] == f"tcp://{net.hosts.ips[5]}:{WORKER_PORT}")
    assert bad.proc.wait(60) == 1
    assert "refused this decode worker" in bad.text() and "page_size: controller 4, worker 8" in bad.text()
    assert "refused decode worker" in net.controller.text()
    assert_greedy_equals_engine(net, reference)
    settled_served(net)  # the counts come with heartbeats
    served = {w["addr"]: w["served"] for w in net.health()["workers"]}
    assert served[new["addr"]] > 0, served


def test_sigterm_drains_running_request(net: NetCluster, reference: Engine) -> None:
    prompt, n = "Once upon a time", 64
    expected = reference.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].text

    async def run() -> tuple[str, str | None]:
        c = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        text, reason, signalled = [], None, None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
            if signalled is None:  # streaming: the request is on a decode worker now
                h = await asyncio.to_thread(net.health)
                busy = [w for w in alive(h, "decode") if w["running"]]
                if busy:
                    victim = next(p for p in net.workers.values() if p.pid == busy[0]["pid"])
                    victim.signal(signal.SIGTERM)
                    signalled = victim
        assert signalled is not None, "no decode worker reported the request running"
        assert await asyncio.to_thread(signalled.proc.wait, 30) == 0, signalled.text()[-2000:]
        return "".join(text), reason

    text, reason = asyncio.run(run())
    assert (text, reason) == (expected, "length")
    assert "left the cluster" in net.controller.text()
    net.wait_for(lambda h: len(alive(h, "decode")) == 1, 10, "the drained worker gone")
    assert client(net).completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0).choices[0].text \
        == reference.generate(["Hi"], SamplingParams(max_tokens=4, temperature=0.0))[0].text
