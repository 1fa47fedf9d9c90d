"""benchmarks/bench_gateway.py on the tiny model's tokenizer: the real gateway process behind
a fake decode side, driven by `runtime bench`. Every request completes with every token, the
delivered rate stays within the offered one, and the processes it started are gone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gateway_bench_delivers_every_token(tiny_model_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gateway.py"), "--model", tiny_model_dir,
                        "--concurrency", "4", "--step-ms", "10", "--output-len", "12", "--waves", "2", "--out", str(out)],
                       cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["concurrency"] == 4 and row["failed"] == 0
    assert 0 < row["delivered_tok_s"] <= row["offered_tok_s"] * 1.05
    assert row["tokens_per_chunk"] >= 1.0 and row["gateway_us_per_token"] > 0
    # Its gateway and fake workers ended with it.
    left = subprocess.run(["pgrep", "-f", f"bench_gateway.py --model {tiny_model_dir}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
