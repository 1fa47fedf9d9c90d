"""Paged decode attention: the Triton split-K kernel against flashinfer (when installed),
the same kernel without split-K, and the GPU's copy bandwidth measured in the same run.

The caches are one layer's K/V views of the engine's page-major KVPool (with the model's
layer count, so pages are as far apart as in serving); "contiguous" rows run the same
kernel on a per-layer contiguous cache, the layout the pool used before, as a baseline.

Achieved bandwidth = KV bytes read (sum of kv_lens * Hkv * D * 2 * element size) / graph
time (eager time where the call cannot be captured).
Two times per implementation, both medians with the L2 cache cleared before each run:
"graph" replays the call captured in a CUDA graph (as the decode loop runs it: no Python
launch overhead), "eager" is triton.testing.do_bench of the plain call (Python wrapper and
launches included wherever they outlast the cache clear).

    python benchmarks/bench_paged_decode.py [--json bench_paged_decode.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.kernels.paged_decode import default_num_splits, paged_decode  # noqa: E402
from runtime.engine.kv_pool import KVPool  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    kv_len: int
    hq: int
    hkv: int
    head_dim: int
    layers: int
    page_size: int = 16
    dtype: str = "bfloat16"


CASES = [
    Case("smollm2_64x1024", 64, 1024, 9, 3, 64, 30),
    Case("llama8b_1x4096", 1, 4096, 32, 8, 128, 32),
    Case("llama8b_32x2048", 32, 2048, 32, 8, 128, 32),
    # Serving at concurrency 256, 1024-token prompts half-way through 256 new tokens.
    Case("llama8b_256x1152", 256, 1152, 32, 8, 128, 32),
]


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the practical peak."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def time_graph(fn, reps: int = 200) -> float:
    """Median GPU time in ms of `fn` replayed from a CUDA graph, L2 cleared before each run."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm the caching allocator on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()  # long enough on the GPU to hide the replay's launch from the timing
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def _setup(c: Case) -> dict:
    dtype = getattr(torch, c.dtype)
    pages_per_seq = -(-c.kv_len // c.page_size)
    num_pages = c.batch * pages_per_seq + 1
    pool = KVPool(c.layers, num_pages, c.page_size, c.hkv, c.head_dim, dtype, "cuda")
    pool.kv.normal_()
    k, v = pool.k_cache(c.layers // 2), pool.v_cache(c.layers // 2)  # [pages, page_size, Hkv, D], page-strided
    # Scattered pages, as after a while of serving.
    perm = torch.randperm(num_pages - 1, device="cuda").to(torch.int32) + 1
    table = perm.view(c.batch, pages_per_seq).contiguous()
    lens = torch.full((c.batch,), c.kv_len, dtype=torch.int32, device="cuda")
    q = torch.randn(c.batch, c.hq, c.head_dim, device="cuda", dtype=dtype)
    kv_bytes = c.batch * c.kv_len * c.hkv * c.head_dim * 2 * k.element_size()
    return dict(q=q, k=k, v=v, k_contig=k.contiguous(), v_contig=v.contiguous(), table=table, lens=lens,
                kv_bytes=kv_bytes, scale=c.head_dim**-0.5)


def _flashinfer_decode(c: Case, s: dict):
    try:
        fi = importlib.import_module("flashinfer")
    except Exception:
        return None
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=c.hq // c.hkv >= 4)
    pages = s["table"].shape[1]
    indptr = torch.arange(c.batch + 1, dtype=torch.int32) * pages
    last = torch.full((c.batch,), c.kv_len - (pages - 1) * c.page_size, dtype=torch.int32)
    wrapper.plan(
        indptr, s["table"].flatten(), last, c.hq, c.hkv, c.head_dim, c.page_size,
        q_data_type=s["q"].dtype, kv_data_type=s["k"].dtype, sm_scale=s["scale"],
    )
    out = torch.empty_like(s["q"])
    return lambda: wrapper.run(s["q"], (s["k"], s["v"]), out=out)


def _sweep(c: Case, s: dict, peak: float) -> list[dict]:
    """Graph time of each launch configuration of the split kernel on this case, best first."""
    import runtime.kernels.paged_decode as pd

    chosen = pd._launch_config
    out = torch.empty_like(s["q"])
    base = default_num_splits(c.batch, c.hkv, s["q"].device, c.kv_len)
    found = []
    try:
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    for splits in sorted({1, 2, base}):
                        pd._launch_config = lambda _d, cfg=(block_n, warps, stages): cfg
                        try:
                            ms = time_graph(lambda: paged_decode(s["q"], s["k"], s["v"], s["table"], s["lens"],
                                                                 s["scale"], out=out, num_splits=splits), reps=50)
                        except Exception as e:  # out of shared memory for this tile
                            print(f"  skip {block_n}/{warps}/{stages}/{splits}: {str(e).splitlines()[0][:80]}")
                            torch.cuda.synchronize()
                            continue
                        found.append(dict(case=asdict(c), impl="sweep", block_n=block_n, num_warps=warps,
                                          num_stages=stages, num_splits=splits, graph_time_us=ms * 1e3,
                                          fraction_of_copy_bw=s["kv_bytes"] / (ms * 1e-3) / peak))
    finally:
        pd._launch_config = chosen
    found.sort(key=lambda r: r["graph_time_us"])
    print(f"{c.name} sweep, best 8 of {len(found)} (BLOCK_N/warps/stages/splits: us, % copy bw):")
    for r in found[:8]:
        print(f"   {r['block_n']}/{r['num_warps']}/{r['num_stages']}/{r['num_splits']}: "
              f"{r['graph_time_us']:.1f} us, {100 * r['fraction_of_copy_bw']:.0f}%")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench_paged_decode.json")
    ap.add_argument("--sweep", action="store_true",
                    help="also time every (BLOCK_N, warps, stages, splits) of the split kernel per case")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from triton.testing import do_bench

    peak = _copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy bandwidth {peak / 1e12:.2f} TB/s (read + write)")
    rows = []
    header = (f"{'case':<18} {'impl':<18} {'splits':>6} {'graph us':>9} {'TB/s':>6} {'% copy bw':>9} "
              f"{'eager us':>9}")
    print(header)
    print("-" * len(header))
    cases = [c for c in CASES if args.cases is None or c.name in args.cases.split(",")]
    for c in cases:
        s = _setup(c)
        out = torch.empty_like(s["q"])
        splits = default_num_splits(c.batch, c.hkv, s["q"].device, c.kv_len)
        impls = {
            "triton split-K": (splits, lambda: paged_decode(
                s["q"], s["k"], s["v"], s["table"], s["lens"], s["scale"], out=out, num_splits=splits)),
            "triton no split": (1, lambda: paged_decode(
                s["q"], s["k"], s["v"], s["table"], s["lens"], s["scale"], out=out, num_splits=1)),
            "triton contiguous": (splits, lambda: paged_decode(
                s["q"], s["k_contig"], s["v_contig"], s["table"], s["lens"], s["scale"], out=out, num_splits=splits)),
        }
        fi = _flashinfer_decode(c, s)
        if fi is not None:
            impls["flashinfer decode"] = (None, fi)
        for impl, (n_split, fn) in impls.items():
            eager_ms = do_bench(fn, return_mode="median")
            try:
                ms = time_graph(fn)
            except RuntimeError as e:  # not capturable: report the eager time alone
                print(f"{impl}: CUDA graph capture failed ({str(e).splitlines()[0]})")
                torch.cuda.synchronize()
                ms = None
            bw = s["kv_bytes"] / ((ms or eager_ms) * 1e-3)
            rows.append(dict(case=asdict(c), impl=impl, num_splits=n_split,
                             graph_time_us=ms and ms * 1e3, eager_time_us=eager_ms * 1e3,
                             kv_bytes=s["kv_bytes"], bandwidth_bytes_per_s=bw, fraction_of_copy_bw=bw / peak))
            graph = f"{ms * 1e3:>9.1f}" if ms else f"{'n/a':>9}"
            print(f"{c.name:<18} {impl:<18} {str(n_split or '-'):>6} {graph} {bw / 1e12:>6.2f} "
                  f"{100 * bw / peak:>8.0f}% {eager_ms * 1e3:>9.1f}")
        if args.sweep:
            rows.extend(_sweep(c, s, peak))
        del s
        torch.cuda.empty_cache()
    result = dict(gpu=gpu, torch=torch.__version__, triton=importlib.import_module("triton").__version__,
                  copy_bandwidth_bytes_per_s=peak, rows=rows)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
