"""The Triton extend-attention kernel against flashinfer's paged prefill and the card's
measured bf16 matrix rate, on the shapes serving runs: prefill of long prompts, chunked
prefill over a cached prefix, and a mixed batch (a prefill chunk among decode rows).

    python benchmarks/bench_extend_attention.py                   # Llama-3-8B heads, bf16
    python benchmarks/bench_extend_attention.py --heads 9,3,64    # SmolLM2 heads
    python benchmarks/bench_extend_attention.py --sweep           # also time other tile configs

Prints a table and writes JSON (--out). Times are medians of triton.testing.do_bench
(CUDA events), per layer's attention call."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.kernels.extend_attention import ExtendPlan, extend_attention  # noqa: E402
from runtime.engine.attention.base import AttentionMetadata  # noqa: E402
from runtime.engine.kv_pool import KVPool  # noqa: E402

DEV = torch.device("cuda")

# name: (q_lens, ctx_lens): new tokens and cached keys before them, per sequence
CASES = {
    "prefill 8x4096": ([4096] * 8, [0] * 8),
    "prefill 1x4096": ([4096], [0]),
    "prefill 32x512": ([512] * 32, [0] * 32),
    "chunk 4x2048 +2048 cached": ([2048] * 4, [2048] * 4),
    "mixed 64 decode(ctx 1024) + 3840": ([1] * 64 + [3840], [1024] * 64 + [0]),
}


def attention_flops(q_lens: list[int], ctx_lens: list[int], hq: int, d: int) -> float:
    """Multiply-adds of QK^T and PV over the keys each query sees (causal), x2 for FLOPs."""
    keys = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, ctx_lens))
    return 4.0 * keys * hq * d


def matrix_rate() -> float:
    """Measured dense bf16 matmul FLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


class Setup:
    def __init__(self, q_lens: list[int], ctx_lens: list[int], hq: int, hkv: int, d: int, ps: int,
                 dtype: torch.dtype) -> None:
        kv_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
        need = [-(-n // ps) for n in kv_lens]
        # Two layers, as served: each layer's cache is a page-strided view of the pool.
        self.pool = KVPool(2, sum(need) + 1, ps, hkv, d, dtype, DEV)
        self.pool.kv.normal_()
        order = (torch.randperm(sum(need)) + 1).tolist()
        self.pages = [[order.pop() for _ in range(n)] for n in need]
        self.meta = AttentionMetadata.build(q_lens, kv_lens, self.pages, ps, DEV)
        self.q = torch.randn(sum(q_lens), hq, d, device=DEV, dtype=dtype)
        self.k, self.v = self.pool.k_cache(1), self.pool.v_cache(1)
        self.q_lens, self.kv_lens, self.ps = q_lens, kv_lens, ps
        self.scale = d**-0.5

    def triton_fn(self, config=None):
        hq, hkv, d = self.q.shape[1], self.k.shape[2], self.q.shape[2]
        plan = ExtendPlan(self.q_lens, hq, hkv, d, self.q.dtype, DEV, config=config)
        out = torch.empty_like(self.q)
        m = self.meta
        return lambda: extend_attention(self.q, self.k, self.v, m.page_table, m.cu_q_lens, m.kv_lens, self.scale,
                                        plan, out=out)

    def flashinfer_fn(self):
        import flashinfer

        hq, hkv, d = self.q.shape[1], self.k.shape[2], self.q.shape[2]
        ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        npages = [len(p) for p in self.pages]
        indptr = torch.tensor([0] + list(torch.tensor(npages).cumsum(0).tolist()), dtype=torch.int32)
        qo = torch.tensor([0] + list(torch.tensor(self.q_lens).cumsum(0).tolist()), dtype=torch.int32)
        idx = torch.tensor(sum(self.pages, []), dtype=torch.int32, device=DEV)
        last = torch.tensor([n - (p - 1) * self.ps for n, p in zip(self.kv_lens, npages)], dtype=torch.int32)
        w.plan(qo, indptr, idx, last, hq, hkv, d, self.ps, causal=True, q_data_type=self.q.dtype,
               kv_data_type=self.q.dtype, sm_scale=self.scale)
        return lambda: w.run(self.q, (self.k, self.v))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="32,8,128", help="Hq,Hkv,D")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sweep", action="store_true", help="time other (BLOCK_M, BLOCK_N, warps, stages) too")
    ap.add_argument("--out", default="bench_extend_attention.json")
    a = ap.parse_args()
    hq, hkv, d = (int(x) for x in a.heads.split(","))
    dtype = getattr(torch, a.dtype)
    try:
        import flashinfer  # noqa: F401
        has_fi = True
    except Exception:
        has_fi = False
    peak = matrix_rate()
    print(f"{torch.cuda.get_device_name(DEV)}: measured bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name in a.cases.split(","):
        q_lens, ctx = CASES[name]
        s = Setup(q_lens, ctx, hq, hkv, d, a.page_size, dtype)
        flops = attention_flops(q_lens, ctx, hq, d)
        tri = s.triton_fn()
        got = tri().float()
        row = dict(case=name, flops=flops)
        row["triton_ms"] = triton.testing.do_bench(tri, warmup=50, rep=300, return_mode="median")
        if has_fi:
            fi = s.flashinfer_fn()
            ref = fi().float()
            row["max_abs_diff_vs_flashinfer"] = (got - ref).abs().max().item()
            row["flashinfer_ms"] = triton.testing.do_bench(fi, warmup=50, rep=300, return_mode="median")
        if a.sweep:
            sweep = {}
            for cfg in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                        (128, 64, 8, 2), (128, 64, 8, 4), (64, 128, 4, 2), (256, 64, 8, 2)]:
                try:
                    sweep[str(cfg)] = triton.testing.do_bench(s.triton_fn(cfg), warmup=25, rep=150,
                                                              return_mode="median")
                except Exception as e:  # out of shared memory / registers for this tile
                    sweep[str(cfg)] = f"failed: {type(e).__name__}"
            row["sweep_ms"] = sweep
            print(json.dumps(sweep), flush=True)
        rows.append(row)
        del s
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(DEV), heads=[hq, hkv, d], dtype=a.dtype,
                       page_size=a.page_size, matmul_flops=peak, rows=rows), f, indent=2)
    print(f"\nattention per layer, heads {hq}/{hkv}, D {d}, page {a.page_size}, {a.dtype}")
    print(f"{'case':<34} {'triton ms':>10} {'TFLOP/s':>8} {'% peak':>7} {'flashinfer ms':>14} {'fi/tri':>7}")
    for r in rows:
        tf = r["flops"] / (r["triton_ms"] * 1e-3)
        fi = f"{r['flashinfer_ms']:14.3f}" if "flashinfer_ms" in r else f"{'-':>14}"
        ratio = f"{r['flashinfer_ms'] / r['triton_ms']:6.2f}x" if "flashinfer_ms" in r else f"{'-':>7}"
        print(f"{r['case']:<34} {r['triton_ms']:10.3f} {tf / 1e12:8.0f} {100 * tf / peak:6.0f}% {fi} {ratio}")


if __name__ == "__main__":
    main()
