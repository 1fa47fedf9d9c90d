"""The gateway alone under streaming load: what it costs per token and whether it keeps up.

A fake decode side (this script with --role workers) answers every Generate with one token
per request every --step-ms, all of a step's tokens in one TokenDeltas message as the decode
worker sends them, so the gateway sees a GPU's step rate at any concurrency without a GPU.
The real gateway process (runtime.tokenizer.server.run_gateway, the model's tokenizer)
serves `runtime bench` as the client. Reported per concurrency: the token rate offered
(concurrency / step) and delivered, the gateway's CPU per token and share of one core (from
/proc), tokens per streamed chunk (above 1: the gateway fell behind and sent what it had
received as one chunk), and the client's ITL / TPOT.

    python benchmarks/bench_gateway.py --model ~/.cache/runtime/SmolLM2-135M-Instruct \
        --concurrency 64,256 --step-ms 20 --output-len 128

The client runs on the same machine: on a small one its CPU competes with the gateway's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import ipc  # noqa: E402
from runtime.config import ClusterConfig  # noqa: E402
from runtime.messages import Abort, ClusterStatus, Generate, TokenDelta, TokenDeltas  # noqa: E402

TEXT = " the quick brown fox jumps over the lazy dog, and then it runs back home again."


async def fake_workers(cfg: ClusterConfig, step_s: float, token_ids: list[int]) -> None:
    """The controller's side of the gateway link: every request gets one token per step."""
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    inbox = ipc.pull(ctx, cfg.controller_addr, bind=True)
    out = ipc.push(ctx, cfg.gateway_addr)
    running: dict[str, list[int]] = {}  # rid -> [tokens left, prompt tokens, tokens sent]
    next_step = next_status = time.monotonic()
    while True:
        while (msg := await inbox.recv_nowait()) is not None:
            if isinstance(msg, Generate):
                running[msg.rid] = [int(msg.params.get("max_tokens") or 16), len(msg.prompt_ids), 0]
            elif isinstance(msg, Abort):
                running.pop(msg.rid, None)
        now = time.monotonic()
        if now >= next_status:
            next_status = now + 0.1
            worker = dict(role="decode", id=0, pid=os.getpid(), alive=True, running=len(running), queued=0,
                          served=0, kv_free_pages=1000, kv_total_pages=1000, inflight=0, device="fake")
            await out.send(ClusterStatus([worker], {}))
        if now >= next_step:
            next_step = max(next_step + step_s, now)
            deltas = []
            for rid, r in list(running.items()):
                r[0] -= 1
                r[2] += 1
                done = r[0] <= 0
                deltas.append(TokenDelta(rid, [token_ids[r[2] % len(token_ids)]], None, "length" if done else None,
                                         None, r[1], 0, r[2]))
                if done:
                    del running[rid]
            if deltas:
                await out.send(TokenDeltas(deltas))
        await asyncio.sleep(max(0.0, min(next_step, next_status) - time.monotonic()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder: its tokenizer and config (no weights read)")
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--step-ms", type=float, default=20.0, help="the fake decode step: one token per request each")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--waves", type=int, default=2, help="prompts per concurrency = waves x concurrency")
    ap.add_argument("--out", default="bench_gateway.json")
    ap.add_argument("--role", choices=("main", "workers", "gateway"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role != "main":
        from runtime.controller.process import config_from_json

        cfg = config_from_json(a.config)
        if a.role == "gateway":
            from runtime.tokenizer.server import run_gateway

            run_gateway(cfg, a.model, "bench", 4096)
        else:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(a.model)(TEXT)["input_ids"]
            asyncio.run(fake_workers(cfg, a.step_ms / 1000.0, ids))
        return

    from runtime.controller.process import config_to_json, die_with_parent

    cfg = ClusterConfig(ipc_dir=tempfile.mkdtemp(prefix="rt-gwbench-"), port=_free_port(), num_prefill=0, num_decode=1)
    url = f"http://127.0.0.1:{cfg.port}"
    me = [sys.executable, __file__, "--model", a.model, "--step-ms", str(a.step_ms), "--config", config_to_json(cfg)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_LOG_LEVEL="warning")
    procs = [subprocess.Popen([*me, "--role", role], env=env, preexec_fn=die_with_parent) for role in ("workers", "gateway")]
    rows = []
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit("the gateway did not become healthy")
            time.sleep(0.5)
        gateway = procs[1].pid
        for conc in [int(c) for c in a.concurrency.split(",")]:
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            cpu0, t0 = _cpu_s(gateway), time.perf_counter()
            subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--url", url, "--concurrency", str(conc),
                            "--num-prompts", str(a.waves * conc), "--input-len", str(a.input_len), "--output-len",
                            str(a.output_len), "--warmup", "1", "--out", str(out)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            cpu, wall = _cpu_s(gateway) - cpu0, time.perf_counter() - t0
            res = json.loads(out.read_text())
            out.unlink()
            summary = res["summary"]
            reqs = [r for r in res["requests"] if r["error"] is None]
            tokens = sum(r["output_tokens"] for r in reqs) + (a.output_len if res["baseline"] else 0)  # + the warm-up
            chunks = sum(len(r["itl_s"]) + 1 for r in reqs)
            row = dict(concurrency=conc, offered_tok_s=conc * 1000.0 / a.step_ms,
                       delivered_tok_s=summary["output_token_throughput"], gateway_us_per_token=1e6 * cpu / tokens,
                       gateway_core_share=cpu / wall, tokens_per_chunk=sum(r["output_tokens"] for r in reqs) / chunks
                       if chunks else None, itl_p50_ms=summary["p50_itl_ms"], itl_p99_ms=summary["p99_itl_ms"],
                       tpot_p50_ms=summary["p50_tpot_ms"], failed=summary["failed"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\nfake step {a.step_ms} ms, {a.output_len} tokens per request")
    print(f"{'conc':>5} {'offered':>9} {'delivered':>9} {'gw us/tok':>9} {'gw core':>7} {'tok/chunk':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>8}")
    for r in rows:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{r['concurrency']:>5} {r['offered_tok_s']:>9.0f} {f(r['delivered_tok_s'], '9.0f')} "
              f"{r['gateway_us_per_token']:>9.1f} {r['gateway_core_share']:>7.2f} {f(r['tokens_per_chunk'], '9.2f')} "
              f"{f(r['itl_p50_ms'], '8.2f')} {f(r['itl_p99_ms'], '8.2f')} {f(r['tpot_p50_ms'], '8.2f')}")
    Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=2))


if __name__ == "__main__":
    main()
