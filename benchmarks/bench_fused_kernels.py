"""The fused Triton kernels (RMSNorm, add + RMSNorm, rotary + KV store, SiLU-mul) against
the torch ops they replace, and the GPU's copy bandwidth measured in the same run.

Both sides are timed as a decode step runs them: 50 calls captured back to back in one CUDA
graph (no Python launch overhead, but every torch kernel of the reference still costs its
launch and gap), timed with CUDA events, the median of 30 replays divided by 50. The inputs
stay in L2 between calls, as in a step where the previous kernel has just written them, so
at large T the achieved bandwidth (unique bytes read + written by the fused kernel / its
time) can exceed the HBM copy bandwidth it is compared with. Each case also checks, on the
GPU, that the fused result equals the torch reference ("diff" = elements that differ,
"ulp" = the largest difference in ulps of the output dtype).

    python benchmarks/bench_fused_kernels.py [--out bench_fused_kernels.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paged_decode import _copy_bandwidth  # noqa: E402
from runtime.kernels.rmsnorm import rmsnorm  # noqa: E402
from runtime.kernels.rope_kv import rope_store_kv  # noqa: E402
from runtime.kernels.silu_mul import silu_and_mul  # noqa: E402
from runtime.engine.kv_pool import KVPool  # noqa: E402
from runtime.engine.model import apply_rotary  # noqa: E402

EPS = 1e-5
PAGE_SIZE = 16


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    hq: int
    hkv: int
    head_dim: int
    inter: int
    layers: int


SHAPES = [Shape("smollm2", 576, 9, 3, 64, 1536, 30), Shape("llama8b", 4096, 32, 8, 128, 14336, 32)]
TOKENS = (1, 16, 256)


@dataclass
class Row:
    shape: str
    op: str
    tokens: int
    fused_us: float
    torch_us: float
    speedup: float
    gbps: float
    pct_copy_bw: float
    diff: int  # elements of the fused output that differ from the torch reference
    max_ulp: float


def _time_graph(fn: Callable[[], object], calls: int = 50, reps: int = 30) -> float:
    """GPU ms per call of `fn`, run `calls` times back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile, and warm the caching allocator on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[reps // 2]


def _torch_rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    diff = (got.float() - ref.float()).abs()
    finfo = torch.finfo(ref.dtype)
    _, exp = torch.frexp(torch.maximum(got.float().abs(), ref.float().abs()))
    ulp = (finfo.eps * torch.exp2(exp.float() - 1)).clamp_min(finfo.smallest_normal * finfo.eps)
    return int((diff > 0).sum()), float((diff / ulp).max())


def _norm_ops(s: Shape, t: int, dtype: torch.dtype) -> dict[str, tuple]:
    """op -> (fused fn, torch fn, bytes moved, fn giving (fused result, torch result))."""
    x = torch.randn(t, s.hidden, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    w = (torch.randn(s.hidden, device="cuda") * 0.5 + 1).to(dtype)
    es = x.element_size()
    # The fused add works in place: replays keep updating xa and ra (the values stay finite;
    # only their time matters), and the check below runs on fresh copies.
    xa, ra = x.clone(), res.clone()

    def add_results() -> tuple[torch.Tensor, torch.Tensor]:
        got, _ = rmsnorm(x.clone(), w, EPS, res.clone())
        return got, _torch_rmsnorm(x + res, w)

    return {
        "rmsnorm": (lambda: rmsnorm(x, w, EPS), lambda: _torch_rmsnorm(x, w), (2 * t * s.hidden + s.hidden) * es,
                    lambda: (rmsnorm(x, w, EPS), _torch_rmsnorm(x, w))),
        # torch: the model's path, residual = x + residual, then the norm of it.
        "add_rmsnorm": (lambda: rmsnorm(xa, w, EPS, ra), lambda: _torch_rmsnorm(x + res, w),
                        (4 * t * s.hidden + s.hidden) * es, add_results),
    }


def _rope_op(s: Shape, t: int, dtype: torch.dtype) -> dict[str, tuple]:
    pages = 4 * max(1, t // PAGE_SIZE) + 2
    pool = KVPool(s.layers, pages, PAGE_SIZE, s.hkv, s.head_dim, dtype, "cuda")
    k_cache, v_cache = pool.k_cache(s.layers // 2), pool.v_cache(s.layers // 2)
    slots = torch.randperm((pages - 1) * PAGE_SIZE, device="cuda")[:t] + PAGE_SIZE
    width = (s.hq + 2 * s.hkv) * s.head_dim
    qkv = torch.randn(t, width, device="cuda", dtype=dtype)
    pos = torch.randint(0, 4096, (t,), device="cuda")
    inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, device="cuda").float() / s.head_dim))
    emb = (pos.float()[:, None] * inv).repeat(1, 2)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [T, 1, D], as Rotary gives
    out: dict[str, torch.Tensor] = {}

    def fused() -> None:
        out["fused"] = rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots, s.hq, s.hkv, s.head_dim)

    def reference() -> None:
        q, k, v = qkv.split([s.hq * s.head_dim, s.hkv * s.head_dim, s.hkv * s.head_dim], dim=-1)
        q = apply_rotary(q.reshape(t, s.hq, s.head_dim), cos, sin)
        k = apply_rotary(k.reshape(t, s.hkv, s.head_dim), cos, sin)
        page, slot = slots // PAGE_SIZE, slots % PAGE_SIZE
        k_cache[page, slot] = k
        v_cache[page, slot] = v.reshape(t, s.hkv, s.head_dim)
        out["torch"] = q
        out["k"] = k

    def results() -> tuple[torch.Tensor, torch.Tensor]:
        fused()
        k_fused = k_cache[slots // PAGE_SIZE, slots % PAGE_SIZE].clone()
        reference()
        return torch.cat([out["fused"].flatten(), k_fused.flatten()]), torch.cat([out["torch"].flatten(),
                                                                                 out["k"].flatten()])

    es = qkv.element_size()
    nbytes = (t * width + 2 * t * s.head_dim + t * width) * es + 8 * t  # qkv, cos+sin, q+k+v, slots
    return {"rope_store_kv": (fused, reference, nbytes, results)}


def _torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_op(s: Shape, t: int, dtype: torch.dtype) -> dict[str, tuple]:
    gate_up = torch.randn(t, 2 * s.inter, device="cuda", dtype=dtype) * 3
    return {"silu_and_mul": (lambda: silu_and_mul(gate_up), lambda: _torch_silu_mul(gate_up),
                             3 * t * s.inter * gate_up.element_size(),
                             lambda: (silu_and_mul(gate_up), _torch_silu_mul(gate_up)))}


def _measure(op: str, fused: Callable, reference: Callable, nbytes: int,
             results: Callable, peak: float, s: Shape, t: int) -> Row:
    got, ref = results()
    diff, max_ulp = _ulps(got, ref)
    fused_ms, torch_ms = _time_graph(fused), _time_graph(reference)
    gbps = nbytes / (fused_ms * 1e-3) / 1e9
    return Row(s.name, op, t, fused_ms * 1e3, torch_ms * 1e3, torch_ms / fused_ms, gbps,
               100 * gbps * 1e9 / peak, diff, max_ulp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_fused_kernels.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused_kernels: skipped, this benchmark needs a CUDA GPU")
        return
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    peak = _copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy bandwidth {peak / 1e9:.0f} GB/s (read + write), {args.dtype}")
    header = (f"{'shape':<8} {'op':<14} {'T':>4} {'fused us':>9} {'torch us':>9} {'speedup':>8} "
              f"{'GB/s':>7} {'% copy':>7} {'diff':>6} {'ulp':>4}")
    print(header)
    print("-" * len(header))
    rows = []
    for s in SHAPES:
        for t in TOKENS:
            ops = {**_norm_ops(s, t, dtype), **_rope_op(s, t, dtype), **_silu_op(s, t, dtype)}
            for op, (fused, reference, nbytes, results) in ops.items():
                r = _measure(op, fused, reference, nbytes, results, peak, s, t)
                rows.append(r)
                print(f"{r.shape:<8} {r.op:<14} {r.tokens:>4} {r.fused_us:>9.2f} {r.torch_us:>9.2f} "
                      f"{r.speedup:>7.2f}x {r.gbps:>7.0f} {r.pct_copy_bw:>6.1f}% {r.diff:>6} {r.max_ulp:>4.0f}")
    Path(args.out).write_text(json.dumps(
        {"gpu": gpu, "dtype": args.dtype, "copy_bandwidth_bytes_per_s": peak, "rows": [asdict(r) for r in rows]},
        indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
