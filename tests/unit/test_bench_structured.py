"""benchmarks/bench_structured.py on the tiny model (it runs on a GPU only when device time is
spent on it, so a broken row must show here first): every row is written and its ratio is
against the right baseline. (The random tiny model runs every constrained output to
max_tokens, so free=json matching json's token count checks the plumbing only; uneven
lengths need real weights.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_rows_and_the_matched_baseline(tiny_model_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_structured.py"), "--model", tiny_model_dir,
                    "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1,2", "--num-prompts", "3",
                    "--max-tokens", "12", "--repeats", "1", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    rows = {(r["mode"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    modes = ["free", "json", "free=json", "keys", "json+jf", "keys+jf"]
    assert set(rows) == {(m, b) for m in modes for b in (1, 2)}
    for b in (1, 2):
        assert rows[("free=json", b)]["tokens"] == rows[("json", b)]["tokens"]
        assert rows[("free", b)]["tokens"] == 3 * 12
        assert rows[("json", b)]["vs"] == "free=json"
        assert rows[("json", b)]["ratio"] == rows[("json", b)]["tok_s"] / rows[("free=json", b)]["tok_s"]
