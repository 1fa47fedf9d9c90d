"""Start `runtime up` configurations one after another and drive each with `runtime bench`
at several concurrencies and datasets; one JSON and one table for all.

    python benchmarks/bench_cluster.py --configs 1x1,2x4 --device cpu --concurrency 1,8
    python benchmarks/bench_cluster.py --configs 0x1,1x1 --device cuda --gpu-placement in-order \
        --concurrency 1,8,32 --extra "--model /path/to/model"

A config is PxD: P prefill workers and D decode replicas (disaggregated), or with P = 0 D
colocated engines that each prefill and decode their own requests (`runtime up --prefill 0`,
no KV transfer): the baseline disaggregation is measured against. `--gpu-placement
in-order` gives config PxD the GPUs 0..P+D-1, prefill workers first, then decode workers
(0xD: one GPU per engine), so 0x1 runs on GPU 0 and 1x1 on GPUs 0 and 1. The device each
worker actually used (from /health) is printed and stored in the JSON."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], timeout: float = 900.0) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "up", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready: "):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if not any(line.startswith("ready: ") for line in lines) or proc.poll() is not None:
        stop(proc)
        raise RuntimeError("runtime up failed:\n" + "".join(lines[-40:]))
    return proc, f"http://127.0.0.1:{port}", lines


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def gpu_flags(p: int, d: int, a: argparse.Namespace) -> list[str]:
    """`runtime up` placement flags for config PxD."""
    if a.gpu_placement == "in-order":
        prefill, decode = list(range(p)), list(range(p, p + d))
    else:
        prefill, decode = ([int(x) for x in g.split(",")] if g else [] for g in (a.prefill_gpus, a.decode_gpus))
    flags = []
    if prefill and p:
        flags += ["--prefill-gpus", ",".join(map(str, prefill))]
    if decode:
        flags += ["--decode-gpus", ",".join(map(str, decode))]
    return flags


def speculative_flags(a: argparse.Namespace) -> list[str]:
    if a.speculative == "none":
        return []
    flags = ["--speculative", a.speculative, "--num-draft-tokens", str(a.num_draft_tokens),
             "--speculative-policy", a.speculative_policy]
    return flags + (["--draft-model", a.draft_model] if a.draft_model else [])


def placement(url: str, wait_s: float = 10.0) -> list[str]:
    """'role id: device' of every worker, as the running cluster reports it (the gateway's
    view can trail the controller's by a status update: ask again until all are known)."""
    deadline = time.monotonic() + wait_s
    while True:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            workers = json.load(r)["workers"]
        if all(w.get("device") for w in workers) or time.monotonic() > deadline:
            return [f"{w['role']} {w['id']}: {w.get('device') or '?'}" for w in workers]
        time.sleep(0.5)


def transfer_totals(url: str) -> tuple[float, float, float, float, float]:
    """From the gateway's /metrics, totals so far: KV bytes sent, seconds and count of KV
    writes (prefill side: posted -> complete), seconds and count of KV waits (decode side:
    pages reserved -> KV landed, the prefill queue and compute included)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    def value(name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    return (value("runtime_kv_transfer_bytes_total"), value("runtime_kv_transfer_latency_seconds_sum"),
            value("runtime_kv_transfer_latency_seconds_count"), value("runtime_kv_wait_seconds_sum"),
            value("runtime_kv_wait_seconds_count"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1x1,2x4",
                    help="comma-separated PxD: P prefill workers, D decode workers; 0xD: D colocated engines")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--datasets", default="random,shared-prefix")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--waves", type=int, default=0,
                    help="if > 0: num-prompts = waves x concurrency (at least 4) for each concurrency")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--gpu-placement", default="none", choices=("none", "in-order"),
                    help="in-order: config PxD gets GPUs 0..P+D-1, prefill first (overrides --prefill/decode-gpus)")
    ap.add_argument("--prefill-gpus", default="", help="the same --prefill-gpus for every config (ignored for 0xD)")
    ap.add_argument("--decode-gpus", default="", help="the same --decode-gpus for every config")
    ap.add_argument("--speculative", default="none", choices=("none", "ngram", "eagle", "draft"))
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--speculative-policy", default="adaptive", choices=("fixed", "adaptive"))
    ap.add_argument("--extra", default="", help="more `runtime up` flags, e.g. '--model PATH'")
    ap.add_argument("--out", default="bench_cluster.json")
    a = ap.parse_args()
    from runtime.bench import main as bench_main

    rows, placements = [], {}
    for conf in a.configs.split(","):
        p, d = (int(x) for x in conf.split("x"))
        args = ["--prefill", str(p), "--decode", str(d), "--device", a.device,
                *gpu_flags(p, d, a), *speculative_flags(a), *shlex.split(a.extra)]
        proc, url, _ = start(args)
        try:
            placements[conf] = placement(url)
            print(f"config {conf} ({'colocated' if p == 0 else 'disaggregated'}): " + ", ".join(placements[conf]), flush=True)
            devices = {w.split(": ", 1)[1] for w in placements[conf]}
            for ds in a.datasets.split(","):
                for c in (int(x) for x in a.concurrency.split(",")):
                    out = tempfile.mktemp(suffix=".json")
                    n = max(4, a.waves * c) if a.waves else a.num_prompts
                    before = transfer_totals(url)
                    bench_main(["--url", url, "--dataset", ds, "--num-prompts", str(n), "--concurrency", str(c),
                                "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--out", out])
                    with open(out) as f:
                        res = json.load(f)
                    s = res["summary"]
                    nbytes, secs, count, wait_s, waits = (x - y for x, y in zip(transfer_totals(url), before))
                    gpus = max(1, sum(1 for x in devices if x.startswith("cuda")))
                    rows.append(dict(config=conf, dataset=ds, concurrency=c, devices=sorted(devices), gpus=gpus,
                                     out_tok_s_per_gpu=(s.get("output_token_throughput") or 0) / gpus,
                                     transfer_ms=1e3 * secs / count if count else None,
                                     kv_wait_ms=1e3 * wait_s / waits if waits else None,
                                     transfer_gib_s=nbytes / secs / 2**30 if secs else None, **{
                        k: s.get(k) for k in ("completed", "failed", "output_token_throughput", "request_throughput",
                                              "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "cache_hit_ratio")}))
                    print("row " + json.dumps(rows[-1]), flush=True)
        finally:
            stop(proc)
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), placement=placements, rows=rows), f, indent=2)
    print()
    for conf, where in placements.items():
        print(f"{conf:>6}: " + ", ".join(where))
    print(f"\n{'config':>6} {'dataset':>13} {'conc':>4} {'ok':>4} {'out tok/s':>10} {'per GPU':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'cache':>6} {'xfer ms':>8} {'xfer GiB/s':>10} {'wait ms':>8}")
    def f(x: float | None, w: int, d: int = 1) -> str:
        return f"{x:{w}.{d}f}" if x is not None else f"{'-':>{w}}"

    for r in rows:
        print(f"{r['config']:>6} {r['dataset']:>13} {r['concurrency']:>4} {r['completed']:>4} {f(r['output_token_throughput'], 10)} "
              f"{f(r['out_tok_s_per_gpu'], 8)} {f(r['p50_ttft_ms'], 9)} {f(r['p99_ttft_ms'], 9)} {f(r['p50_itl_ms'], 8)} "
              f"{f(r['p99_itl_ms'], 8)} {f(r['cache_hit_ratio'], 6, 2)} {f(r['transfer_ms'], 8)} {f(r['transfer_gib_s'], 10, 2)} "
              f"{f(r['kv_wait_ms'], 8)}")


if __name__ == "__main__":
    main()
