"""What tcp:// and CURVE cost: the same `runtime bench` through `runtime up --prefill 1
--decode 1` (ipc:// on one host, the baseline) and through a namespace cluster (tests/e2e/
netns.py: controller, one prefill and one decode worker, each in its own network namespace,
only tcp:// between them), once with CURVE and once --insecure. Needs root (ip netns).

    sudo python benchmarks/bench_multihost.py --model /path/to/model --device cpu
    python benchmarks/bench_multihost.py --tiny   # a tiny random model (what CI machines run)

Prints TTFT / ITL / TPOT side by side and writes JSON (--out)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_cluster import start as start_up  # noqa: E402
from benchmarks.bench_cluster import stop as stop_up  # noqa: E402
from runtime.security import create_keys  # noqa: E402
from tests.e2e.netns import Hosts, netns_unavailable  # noqa: E402

COLUMNS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p50_itl_ms", "p99_itl_ms",
           "mean_tpot_ms", "output_token_throughput")


def bench(url: str, a: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, "-m", "runtime.cli", "bench", "--url", url, "--num-prompts", str(a.num_prompts),
           "--concurrency", str(a.concurrency), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--out", out]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())["summary"]


def wait_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}/health never became ready")


def run_netns(a: argparse.Namespace, engine: list[str], work: Path, secure: bool) -> dict:
    hosts = Hosts(3, work)
    try:
        link = ["--curve-keys", str(work / "keys")] if secure else ["--insecure"]
        py = [sys.executable, "-m", "runtime.cli"]
        ctl = hosts.start(0, [*py, "controller", "--listen", "tcp://0.0.0.0:29500", "--advertise-host", hosts.ips[0],
                              "--host", "0.0.0.0", "--port", "8000", *link, *engine], "controller")
        for i, role in ((1, "prefill"), (2, "decode")):
            hosts.start(i, [*py, "worker", "--role", role, "--controller", f"tcp://{hosts.ips[0]}:29500", *link,
                            *engine], role)
        ctl.wait_for("ready: ", 300)
        url = f"http://{hosts.host0_ip}:8000"
        wait_health(url, 300)
        return bench(url, a, str(work / f"netns-{'curve' if secure else 'plain'}.json"))
    finally:
        hosts.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (tests/conftest.py's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--out", default="bench-multihost.json")
    a = p.parse_args()
    why = netns_unavailable()
    if why:
        print(f"bench_multihost: {why}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-multihost-"))
    os.chmod(work, 0o755)
    model = a.model
    if a.tiny:
        from tests.conftest import _save_tiny

        model = _save_tiny(work / "tiny")
    engine = ["--device", a.device, "--kv-cache-tokens", "8192", *(["--model", model] if model else [])]
    create_keys(str(work / "keys"))
    results: dict[str, dict] = {}
    proc, url, _ = start_up(["--prefill", "1", "--decode", "1", *engine])
    try:
        results["up 1x1 (ipc://)"] = bench(url, a, str(work / "up.json"))
    finally:
        stop_up(proc)
    results["netns 1+1 tcp:// CURVE"] = run_netns(a, engine, work, secure=True)
    results["netns 1+1 tcp:// no CURVE"] = run_netns(a, engine, work, secure=False)
    print(f"\n{a.num_prompts} prompts, concurrency {a.concurrency}, input {a.input_len}, output {a.output_len}, "
          f"{a.device}, model {model or 'default'}")
    print(f"{'':28s}" + "".join(f"{c.removesuffix('_ms'):>14s}" for c in COLUMNS))
    for name, r in results.items():
        print(f"{name:28s}" + "".join(f"{(r.get(c) or 0.0):14.2f}" for c in COLUMNS)
              + ("" if not r.get("failed") else f"   ({r['failed']} failed)"))
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
