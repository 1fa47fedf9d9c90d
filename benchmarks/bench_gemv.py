"""Decode-shaped projections: runtime/kernels/gemv.py against torch's F.linear (cuBLAS), on the
Llama-3-8B shapes (bf16, M 1/2/4/8 rows), with the GPU's copy bandwidth measured in the
same run (issue 14).

Each implementation is timed as a decode step runs it: `calls` (>= 20) launches captured in
one CUDA graph, rotating over enough copies of the weight that a call never finds its
weight in the 50 MB L2 cache; triton.testing.do_bench replays the graph (median, L2
flushed before each replay) and the time per call is the replay's / calls. Launch gaps
inside the graph are counted, as they are in a real step. Achieved bandwidth = weight bytes
/ time per call, against the copy bandwidth (bytes read + written per second).

The "step" line adds up one decode step's projections at batch 1 (32 layers of qkv, o_proj,
gate_up, down, and the lm_head once): torch, gemv, and the better of the two per shape.

    python benchmarks/bench_gemv.py [--out bench_gemv.json] [--rows 1,2,4,8] [--sweep] [--smollm2]
        [--tuned-out runtime/kernels/configs/gemv_bf16_<GPU name, spaces as _>.<smXY>.json]

--sweep also times every config in kernels.gemv_configs.CANDIDATES on each shape and row count
(about a minute more, mostly compiling); --smollm2 adds SmolLM2-135M's shapes. --tuned-out
(with --sweep) writes what kernels/gemv_configs.py's bf16 table lookup reads: per shape and measured
row bucket (BM = next power of two of the rows) the fastest config of those that matched the
fp32 product, or "torch" where cuBLAS was faster than every config (model.linear then keeps
F.linear); buckets not measured are left out (model.linear then follows RUNTIME_GEMV).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paged_decode import _copy_bandwidth  # noqa: E402
from runtime.kernels.gemv import gemv  # noqa: E402
from runtime.kernels.gemv_configs import CANDIDATES, GemvConfig, default_config  # noqa: E402

LAYERS = 32  # Llama-3-8B
# (name, N, K): the fused projections as fuse_projections serves them, and the lm_head.
LLAMA8B = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
           ("lm_head", 128256, 4096)]
LM_HEAD_49K = ("lm_head_49k", 49152, 4096)  # the served 8B shape's lm_head (SmolLM2's vocabulary)
SMOLLM2 = [("smol_qkv", 960, 576), ("smol_o", 576, 576), ("smol_gate_up", 3072, 576), ("smol_down", 576, 1536)]
ROWS = (1, 2, 4, 8)
COLD_BYTES = 200 << 20  # distinct weight bytes between two uses of one copy: 4x the L2


def _time_per_call(fn: Callable[[int], object], copies: int, calls: int) -> float:
    """us per call of fn(i) (i = the weight copy), `calls` calls replayed from one CUDA graph."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(copies, 2)):
            fn(i)  # compile, and warm the caching allocator on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    ms = do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
    return ms * 1e3 / calls


class Shape:
    def __init__(self, name: str, n: int, k: int) -> None:
        self.name, self.n, self.k = name, n, k
        self.nbytes = n * k * 2
        self.copies = max(1, min(128, math.ceil(COLD_BYTES / self.nbytes)))
        self.calls = max(20, self.copies)
        self.weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(self.copies)]

    def time(self, x: torch.Tensor, config: GemvConfig | None = None, torch_ref: bool = False) -> float:
        if torch_ref:
            return _time_per_call(lambda i: F.linear(x, self.weights[i]), self.copies, self.calls)
        return _time_per_call(lambda i: gemv(x, self.weights[i], config=config), self.copies, self.calls)


def _row(s: Shape, m: int, peak: float) -> dict:
    x = torch.randn(m, s.k, device="cuda").to(torch.bfloat16)
    diff = (gemv(x, s.weights[0]).float() - F.linear(x, s.weights[0]).float()).abs().max().item()
    ours, ref = s.time(x), s.time(x, torch_ref=True)
    cfg = default_config(m, s.n, s.k)
    row = dict(shape=s.name, m=m, n=s.n, k=s.k, weight_mb=s.nbytes / 1e6, torch_us=ref, gemv_us=ours,
               speedup=ref / ours, gemv_gbps=s.nbytes / ours / 1e3, torch_gbps=s.nbytes / ref / 1e3,
               config=asdict(cfg), max_abs_diff_vs_torch=diff)
    print(f"{s.name:<12} {m:>2} {s.nbytes / 1e6:>8.1f} {ref:>9.2f} {ours:>9.2f} {ref / ours:>7.2f}x "
          f"{row['gemv_gbps']:>7.0f} {100 * row['gemv_gbps'] * 1e9 / peak:>6.1f}% {row['torch_gbps']:>7.0f} "
          f"{cfg.block_n:>3}x{cfg.block_k:<4} w{cfg.num_warps} s{cfg.num_stages} {diff:>8.2g}")
    return row


def _sweep(shapes: list[Shape], peak: float, rows: tuple[int, ...] = ROWS,
           after_shape: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every candidate config on every shape and row count; `after_shape(found so far)` runs
    after each shape (a run cut short keeps what it measured)."""
    found = []
    print("\nsweep: shape M block_n block_k warps stages dot -> us, GB/s, % copy bw")
    for s in shapes:
        for m in rows:
            x = torch.randn(m, s.k, device="cuda").to(torch.bfloat16)
            ref = F.linear(x.float(), s.weights[0].float())
            tol = ref.abs().max().item() * 2 ** -6  # a few bf16 ulps of the largest output
            best = None
            for cfg in CANDIDATES:
                if not cfg.dot and m != 1:
                    continue
                us = s.time(x, cfg)
                gbps = s.nbytes / us / 1e3
                # Checked against the fp32 product: a config that computes wrong never enters the table.
                diff = (gemv(x, s.weights[0], config=cfg).float() - ref).abs().max().item()
                found.append(dict(shape=s.name, m=m, config=asdict(cfg), us=us, gbps=gbps, max_abs_diff=diff,
                                  correct=diff <= tol))
                best = min(best or (us, cfg), (us, cfg), key=lambda t: t[0])
                print(f"  {s.name:<12} {m:>2} {cfg.block_n:>3} {cfg.block_k:>4} {cfg.num_warps} {cfg.num_stages} "
                      f"{'dot' if cfg.dot else 'ew ':<3} -> {us:8.2f} {gbps:6.0f} {100 * gbps * 1e9 / peak:5.1f}%")
            print(f"  best {s.name} M={m}: {best[1]} {best[0]:.2f} us")
        if after_shape is not None:
            after_shape(found)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gemv.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts (at most 16)")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: every 8B shape; "
                    f"of {', '.join(n for n, _, _ in LLAMA8B + [LM_HEAD_49K])})")
    ap.add_argument("--tuned-out", default="", help="with --sweep: write the measured table for kernels/gemv.py here")
    args = ap.parse_args()
    rows_m = tuple(int(r) for r in args.rows.split(","))
    if not torch.cuda.is_available():
        print("bench_gemv: skipped, this benchmark needs a CUDA GPU")
        return
    torch.manual_seed(0)
    peak = _copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy bandwidth {peak / 1e9:.0f} GB/s (read + write), bf16")
    header = (f"{'shape':<12} {'M':>2} {'W MB':>8} {'torch us':>9} {'gemv us':>9} {'speedup':>8} {'GB/s':>7} "
              f"{'% copy':>7} {'torch':>7} {'config':<14} {'max diff':>8}")
    print(header)
    print("-" * len(header))
    shapes, rows = [], []
    wanted = set(args.shapes.split(",")) if args.shapes else None
    for name, n, k in LLAMA8B + [LM_HEAD_49K] + (SMOLLM2 if args.smollm2 else []):
        if wanted is not None and name not in wanted and not name.startswith("smol"):
            continue
        s = Shape(name, n, k)
        rows += [_row(s, m, peak) for m in rows_m]
        if args.sweep and not name.startswith("smol"):
            shapes.append(s)  # kept for the sweep (about 1.9 GB of weights in all)
    step = {"torch": 0.0, "gemv": 0.0, "best": 0.0, "bytes": 0}
    for r in rows:
        if r["m"] == 1 and not r["shape"].startswith("smol") and r["shape"] != LM_HEAD_49K[0]:
            reps = 1 if r["shape"] == "lm_head" else LAYERS
            step["torch"] += reps * r["torch_us"]
            step["gemv"] += reps * r["gemv_us"]
            step["best"] += reps * min(r["torch_us"], r["gemv_us"])
            step["bytes"] += reps * r["n"] * r["k"] * 2
    step["copy_bandwidth_floor"] = step["bytes"] / peak * 1e6
    print(f"\nstep at M=1 (projections, {LAYERS} layers + lm_head, {step['bytes'] / 1e9:.2f} GB): torch "
          f"{step['torch'] / 1e3:.3f} ms, gemv {step['gemv'] / 1e3:.3f} ms, best per shape {step['best'] / 1e3:.3f} ms; "
          f"at the copy bandwidth {step['copy_bandwidth_floor'] / 1e3:.3f} ms")
    def write_table(found: list[dict]) -> None:
        done = {f["shape"] for f in found}
        Path(args.tuned_out).parent.mkdir(parents=True, exist_ok=True)
        table = tuned_table([r for r in rows if r["shape"] in done], found, gpu)
        Path(args.tuned_out).write_text(json.dumps(table, indent=1, sort_keys=True))

    sweep = _sweep(shapes, peak, rows_m, write_table if args.tuned_out else None) if args.sweep else []
    if args.tuned_out and sweep:
        print(f"wrote {args.tuned_out}")
    result = dict(gpu=gpu, torch=torch.__version__, triton=importlib.import_module("triton").__version__,
                  copy_bandwidth_bytes_per_s=peak, rows=rows,
                  step_m1_us=step, sweep=sweep)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def tuned_table(rows: list[dict], sweep: list[dict], gpu: str) -> dict:
    """kernels/gemv_configs.py's bf16 table from the measured rows (F.linear per shape and M) and the
    sweep's configs that computed correctly: per shape and measured row bucket, the fastest
    config, or "torch" where F.linear was faster."""
    table: dict = {"gpu": gpu}
    for r in rows:
        cands = [(f["us"], f["config"]) for f in sweep
                 if f["shape"] == r["shape"] and f["m"] == r["m"] and f.get("correct", True)]
        if not cands:
            continue
        us, cfg = min(cands, key=lambda t: t[0])
        # Only the row bucket measured: one that was not keeps model.linear's mode rule.
        table[f"{r['n']}x{r['k']}@{1 << max(0, r['m'] - 1).bit_length()}"] = cfg if us < r["torch_us"] else "torch"
    return table


if __name__ == "__main__":
    main()
