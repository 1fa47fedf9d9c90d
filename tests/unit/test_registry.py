"""Joining over tcp:// without processes: config validation and address derivation, the
model fingerprint, the registry's admission rule, and CURVE on a real socket pair (the
right client key gets through, another is refused)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq

from runtime.config import ClusterConfig, EngineConfig, JoinConfig
from runtime.controller.registry import Registry
from runtime.fingerprint import model_fingerprint
from runtime.messages import Register
from runtime.security import CurveKeys, Guard, create_keys


def test_tcp_cluster_config() -> None:
    with pytest.raises(ValueError, match="--curve-keys"):
        ClusterConfig(controller_url="tcp://0.0.0.0:29500", num_prefill=0, num_decode=0)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        ClusterConfig(controller_url="10.0.0.1:29500", insecure=True)
    cfg = ClusterConfig(controller_url="tcp://0.0.0.0:29500", num_prefill=0, num_decode=0, insecure=True)
    assert not cfg.colocated and cfg.roles == ("prefill", "decode")  # --prefill 0 is no local worker, not colocated
    assert (cfg.controller_bind, cfg.controller_addr) == ("tcp://0.0.0.0:29500", "tcp://127.0.0.1:29500")
    assert (cfg.gateway_bind, cfg.gateway_addr) == ("tcp://0.0.0.0:29501", "tcp://127.0.0.1:29501")
    worker = ClusterConfig(controller_url="tcp://10.0.0.1:29500", num_prefill=0, num_decode=0, insecure=True)
    assert worker.gateway_addr == "tcp://10.0.0.1:29501"
    assert ClusterConfig().controller_addr.startswith("ipc://")  # runtime up: unchanged
    with pytest.raises(ValueError, match="role"):
        JoinConfig("gateway")


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_fingerprint_follows_the_model_not_its_path(tiny_model_dir: str, tiny_tied_model_dir: str, tmp_path: Path) -> None:
    e = EngineConfig(max_model_len=256, page_size=4)
    here = model_fingerprint(e, tiny_model_dir)
    assert model_fingerprint(e, _copy(tiny_model_dir, tmp_path / "elsewhere")) == here
    assert model_fingerprint(e, tiny_tied_model_dir)["model"] != here["model"]
    # Same architecture, other weights: the sampled bytes of the weight file differ.
    other = _copy(tiny_model_dir, tmp_path / "other")
    weights = next(Path(other).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    assert model_fingerprint(e, other)["model"] != here["model"]


def _register(**kw: object) -> Register:
    base = dict(nonce="n", role="decode", addr="tcp://10.0.0.2:29600", pid=1, host="h", device="cpu",
                fingerprint={"model": "m", "page_size": 4}, kv_layout={"dtype": "float32"}, transfer="zmq",
                kv_total_pages=8)
    base.update(kw)
    return Register(**base)


def test_registry_admission_rule() -> None:
    reg = Registry(SimpleNamespace(handlers={}), {"model": "m", "page_size": 4}, "zmq")
    assert reg.why_not(_register()) == ""
    assert "page_size: controller 4, worker 8" in reg.why_not(_register(fingerprint={"model": "m", "page_size": 8}))
    assert "--transfer zmq" in reg.why_not(_register(transfer="nixl"))
    reg.layout = {"dtype": "float32"}
    assert "KV layout" in reg.why_not(_register(kv_layout={"dtype": "bfloat16"}))
    assert "unknown role" in reg.why_not(_register(role="gateway"))


def test_curve_admits_cluster_keys_and_refuses_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    create_keys(str(tmp_path / "keys"))
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    for f in ("server.key", "server.key_secret"):
        shutil.copy(tmp_path / "keys" / f, intruder / f)
    create_keys(str(intruder))  # the right server key, a client key never issued
    keys, other = CurveKeys.load(str(tmp_path / "keys")), CurveKeys.load(str(intruder))
    ctx = zmq.Context()
    guard = Guard(ctx, keys, "test")
    server = ctx.socket(zmq.PULL)
    keys.apply(server, bind=True)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    clients = []
    try:
        for k, payload in ((other, b"intruder"), (keys, b"member")):
            c = ctx.socket(zmq.PUSH)
            c.linger = 0
            k.apply(c, bind=False)
            c.connect(f"tcp://127.0.0.1:{port}")
            c.send(payload)
            clients.append(c)
        assert server.poll(5000) and server.recv() == b"member"
        assert not server.poll(500)  # the intruder's message never arrives
        deadline = time.monotonic() + 5
        while guard.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 1
        assert "refused a peer at 127.0.0.1" in caplog.text
    finally:
        for c in clients:
            c.close(0)
        server.close(0)
        guard.stop()
        ctx.term()
