"""FP8 (e4m3) weights in decode-shaped projections: runtime/kernels/gemv.py's weight-only
product against `torch._scaled_mm` (activations quantized per token by
kernels/fp8_quant.py, as Fp8Linear serves wider inputs) and against bf16 F.linear (cuBLAS),
on the Llama-3-8B shapes, M 1 to 64 rows (issue 17).

Timed as bench_gemv.py times (calls captured in one CUDA graph over enough weight copies
that none is found in L2). For each shape and M the gemv runs its default config and every
config in FP8_CANDIDATES; the best is printed, so the defaults in kernels/gemv.py can be set
from measurements. The "step" line adds up one batch-1 step's projections (32 layers).

    python benchmarks/bench_gemv_fp8.py [--rows 1,4,16,32,64] [--out bench_gemv_fp8.json]
        [--tuned-out runtime/kernels/configs/gemv_fp8_<GPU name, spaces as _>.<smXY>.json]

--tuned-out writes what kernels/gemv_configs.py's fp8_tuned reads: per shape and BM (powers of two up
to 64) the best config at the nearest measured row count, or "torch" where _scaled_mm was faster
for that shape, and max_rows, the largest measured row count up to which the best gemv beat
_scaled_mm on every shape (what serves shapes the table does not name).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemv import COLD_BYTES, LAYERS, LLAMA8B, _time_per_call  # noqa: E402
from bench_paged_decode import _copy_bandwidth  # noqa: E402
from runtime.engine.quant.fp8 import quantize_fp8  # noqa: E402
from runtime.kernels.fp8_quant import quantize_rows  # noqa: E402
from runtime.kernels.gemv import gemv  # noqa: E402
from runtime.kernels.gemv_configs import FP8_CANDIDATES, default_config  # noqa: E402


class Fp8Shape:
    def __init__(self, name: str, n: int, k: int) -> None:
        self.name, self.n, self.k = name, n, k
        self.nbytes = n * k  # one byte per weight
        self.copies = max(1, min(128, math.ceil(COLD_BYTES / self.nbytes)))
        self.calls = max(20, self.copies)
        self.q, self.s = [], []
        for _ in range(self.copies):
            q, s = quantize_fp8(torch.randn(n, k, device="cuda") * k ** -0.5)
            self.q.append(q)
            self.s.append(s)
        self.bf16 = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
                     for _ in range(max(1, min(128, math.ceil(COLD_BYTES / (2 * n * k)))))]

    def gemv_us(self, x: torch.Tensor, cfg=None) -> float:
        return _time_per_call(lambda i: gemv(x, self.q[i], scale=self.s[i], config=cfg), self.copies, self.calls)

    def scaled_mm_us(self, x: torch.Tensor) -> float:
        def call(i: int) -> torch.Tensor:
            xq, sx = quantize_rows(x)
            return torch._scaled_mm(xq, self.q[i].t(), scale_a=sx, scale_b=self.s[i].view(1, -1),
                                    out_dtype=torch.bfloat16)
        return _time_per_call(call, self.copies, self.calls)

    def bf16_us(self, x: torch.Tensor) -> float:
        return _time_per_call(lambda i: F.linear(x, self.bf16[i]), len(self.bf16), max(20, len(self.bf16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,32,64")
    ap.add_argument("--no-sweep", action="store_true", help="the default config only")
    ap.add_argument("--out", default="bench_gemv_fp8.json")
    ap.add_argument("--tuned-out", default="", help="write the measured configs for kernels/gemv.py here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv_fp8: skipped, this benchmark needs a CUDA GPU")
        return
    torch.manual_seed(0)
    peak = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {peak / 1e9:.0f} GB/s")
    print(f"{'shape':<8} {'M':>3} {'bf16 us':>8} {'smm us':>8} {'gemv us':>8} {'best us':>8} {'best GB/s':>9}"
          "  best config")
    rows = []
    for name, n, k in LLAMA8B[:4]:
        s = Fp8Shape(name, n, k)
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = F.linear(x.float(), (s.q[0].float() * s.s[0][:, None])).to(torch.bfloat16).float()
            diff = (gemv(x, s.q[0], scale=s.s[0]).float() - ref).abs().max().item()
            row = dict(shape=name, m=m, n=n, k=k, bf16_us=s.bf16_us(x), scaled_mm_us=s.scaled_mm_us(x),
                       gemv_us=s.gemv_us(x), default=asdict(default_config(m, n, k, fp8=True)), max_abs_diff=diff)
            best = (row["gemv_us"], row["default"])
            if not a.no_sweep:
                for cfg in FP8_CANDIDATES:
                    if (not cfg.dot and m != 1) or (cfg.split_k > 1 and m == 1):
                        continue  # elementwise: one row; split-K: for 16-64 rows
                    try:
                        us = s.gemv_us(x, cfg)
                    except OutOfResources as e:  # e.g. BM 64 x BK 512 x 3 stages: over the shared memory
                        row.setdefault("sweep", []).append(dict(config=asdict(cfg), error=str(e)))
                        continue
                    row.setdefault("sweep", []).append(dict(config=asdict(cfg), us=us))
                    best = min(best, (us, asdict(cfg)), key=lambda t: t[0])
            row["best_us"], row["best_config"] = best
            rows.append(row)
            print(f"{name:<8} {m:>3} {row['bf16_us']:8.2f} {row['scaled_mm_us']:8.2f} {row['gemv_us']:8.2f} "
                  f"{best[0]:8.2f} {s.nbytes / best[0] / 1e3:9.0f}  {best[1]}", flush=True)
        write(a, peak, rows)  # after each shape: a run cut short keeps what it measured
    for m in sorted({r["m"] for r in rows}):
        sel = [r for r in rows if r["m"] == m]
        tot = {key: LAYERS * sum(r[key] for r in sel) / 1e3
               for key in ("bf16_us", "scaled_mm_us", "gemv_us", "best_us")}
        print(f"step projections at M={m} (32 layers, ms): bf16 {tot['bf16_us']:.3f}  "
              f"scaled_mm {tot['scaled_mm_us']:.3f}  gemv {tot['gemv_us']:.3f}  best gemv {tot['best_us']:.3f}")


def write(a: argparse.Namespace, peak: float, rows: list[dict]) -> None:
    result = dict(gpu=torch.cuda.get_device_name(), copy_bandwidth=peak, rows=rows)
    Path(a.out).write_text(json.dumps(result, indent=2))
    if a.tuned_out:
        Path(a.tuned_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.tuned_out).write_text(json.dumps(tuned_table(rows), indent=1, sort_keys=True))


def tuned_table(rows: list[dict]) -> dict:
    """kernels/gemv_configs.py's fp8_tuned file from the measured rows (see the module note)."""
    measured = sorted({r["m"] for r in rows})
    # per_shape: each entry says whether the gemv won (kernels/gemv_configs.fp8_uses_gemv)
    table: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "per_shape": True}
    for r in rows:
        key = f"{r['n']}x{r['k']}"
        for bm in (1, 2, 4, 8, 16, 32, 64):
            nearest = min(measured, key=lambda m: (abs(m.bit_length() - bm.bit_length()), m))
            if nearest == r["m"] and (r["best_config"]["dot"] or bm == 1):
                # "torch": _scaled_mm was faster for this shape at these rows (Fp8Linear asks per shape)
                table[f"{key}@{bm}"] = r["best_config"] if r["best_us"] < r["scaled_mm_us"] else "torch"
    wins = [m for m in measured if all(r["best_us"] < r["scaled_mm_us"] for r in rows if r["m"] == m)]
    # 0 where even one row lost: then _scaled_mm serves every row count.
    table["max_rows"] = max((m for m in wins if all(w in wins for w in measured if w <= m)), default=0)
    return table


if __name__ == "__main__":
    main()
