"""Start `runtime up` configurations one after another and drive each with `runtime bench`
at several concurrencies and datasets; one JSON and one table for all.

    python benchmarks/bench_cluster.py --configs 1x1,2x4 --device cpu --concurrency 1,8
    python benchmarks/bench_cluster.py --configs 1x1 --device cuda --prefill-gpus 0 --decode-gpus 1 \
        --extra "--model /path/to/model"

A config is PxD (P prefill workers, D decode replicas); `single` is the same model served by
one offline engine process behind the same gateway path, i.e. `--prefill 1 --decode 1` on one
device, the baseline for GPU placement runs."""
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1x1,2x4")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--datasets", default="random,shared-prefix")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prefill-gpus", default="")
    ap.add_argument("--decode-gpus", default="")
    ap.add_argument("--extra", default="", help="more `runtime up` flags, e.g. '--model PATH'")
    ap.add_argument("--out", default="bench_cluster.json")
    a = ap.parse_args()
    from runtime.bench import main as bench_main

    rows = []
    for conf in a.configs.split(","):
        p, d = (int(x) for x in conf.split("x"))
        args = ["--prefill", str(p), "--decode", str(d), "--device", a.device, *shlex.split(a.extra)]
        if a.prefill_gpus:
            args += ["--prefill-gpus", a.prefill_gpus, "--decode-gpus", a.decode_gpus]
        proc, url, _ = start(args)
        try:
            for ds in a.datasets.split(","):
                for c in (int(x) for x in a.concurrency.split(",")):
                    out = tempfile.mktemp(suffix=".json")
                    bench_main(["--url", url, "--dataset", ds, "--num-prompts", str(a.num_prompts), "--concurrency", str(c),
                                "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--out", out])
                    with open(out) as f:
                        res = json.load(f)
                    s = res["summary"]
                    rows.append(dict(config=conf, dataset=ds, concurrency=c, gpus=p + d if a.prefill_gpus else None, **{
                        k: s.get(k) for k in ("completed", "failed", "output_token_throughput", "request_throughput",
                                              "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "cache_hit_ratio")}))
        finally:
            stop(proc)
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), rows=rows), f, indent=2)
    print(f"\n{'config':>6} {'dataset':>13} {'conc':>4} {'ok':>4} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'cache':>6}")
    def f(x: float | None, w: int, d: int = 1) -> str:
        return f"{x:{w}.{d}f}" if x is not None else f"{'-':>{w}}"

    for r in rows:
        print(f"{r['config']:>6} {r['dataset']:>13} {r['concurrency']:>4} {r['completed']:>4} {f(r['output_token_throughput'], 10)} "
              f"{f(r['p50_ttft_ms'], 9)} {f(r['p99_ttft_ms'], 9)} {f(r['p50_itl_ms'], 8)} {f(r['p99_itl_ms'], 8)} {f(r['cache_hit_ratio'], 6, 2)}")


if __name__ == "__main__":
    main()
