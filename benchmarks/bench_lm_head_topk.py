"""The fused lm_head + top-k kernels (kernels/lm_head_topk.py) against the torch ops a draft
step used before them: F.linear to [M, V] logits, then argmax (a chain's draft, k 1) or
topk and logsumexp (a tree's candidates, k > 1). Both sides are timed as a draft step runs
them: captured back to back in one CUDA graph (bench_fused_kernels._time_graph). The
achieved bandwidth is lm_head's bytes read once / the fused time, against the GPU's copy
bandwidth measured in the same run. "agree" is the fraction of rows whose k tokens equal
torch's, in order (they can differ on near-ties: torch rounds the logits to bf16 first).

    python benchmarks/bench_lm_head_topk.py [--out bench_lm_head_topk.json] [--sweep]

--sweep also times the kernel's block sizes and warps on SmolLM2's head (M 1 and 8).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fused_kernels import _time_graph  # noqa: E402
from bench_paged_decode import _copy_bandwidth  # noqa: E402
from kernels.lm_head_topk import lm_head_topk  # noqa: E402

# (name, H, V): SmolLM2's full vocabulary, two draft vocabularies of it, Llama 3 8B's.
HEADS = [("smollm2", 576, 49152), ("smol-16k", 576, 16384), ("smol-8k", 576, 8192), ("llama3-8b", 4096, 128256)]
ROWS = (1, 8, 16, 64)  # a chain at batch 1, a tree level at batch 1, batch 16 chains, batch 8 trees
KS = (1, 8)


@dataclass
class Row:
    head: str
    rows: int
    k: int
    fused_us: float
    torch_us: float
    speedup: float
    gbps: float
    pct_copy_bw: float
    agree: float


def _torch_topk(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x, w).float()
    if k == 1:
        return logits.amax(-1, keepdim=True), logits.argmax(-1, keepdim=True)
    v, t = logits.topk(k, dim=-1)
    return v - logits.logsumexp(-1, keepdim=True), t


def _sweep() -> list[dict]:
    _, h, v = HEADS[0]
    w = (torch.randn(v, h, device="cuda") * h ** -0.5).to(torch.bfloat16)
    found = []
    print(f"\nsweep, {HEADS[0][0]}: M k block_v warps -> us")
    for m in (1, 8):
        x = torch.randn(m, h, device="cuda").to(torch.bfloat16)
        for k in KS:
            for bv in (64, 128, 256, 512):
                for warps in (2, 4, 8):
                    us = 1e3 * _time_graph(lambda: lm_head_topk(x, w, k, logprobs=k > 1, block_v=bv, num_warps=warps))
                    found.append(dict(rows=m, k=k, block_v=bv, num_warps=warps, us=us))
                    print(f"  {m:>2} {k} {bv:>4} {warps} -> {us:.2f}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_lm_head_topk.json")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_lm_head_topk: skipped, this benchmark needs a CUDA GPU")
        return
    torch.manual_seed(0)
    peak = _copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy bandwidth {peak / 1e9:.0f} GB/s (read + write), bf16")
    header = f"{'head':<10} {'M':>3} {'k':>2} {'fused us':>9} {'torch us':>9} {'speedup':>8} {'GB/s':>7} {'% copy':>7} {'agree':>6}"
    print(header)
    print("-" * len(header))
    out = []
    for name, h, v in HEADS:
        w = (torch.randn(v, h, device="cuda") * h ** -0.5).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, h, device="cuda").to(torch.bfloat16)
            for k in KS:
                _, got = lm_head_topk(x, w, k, logprobs=k > 1)
                _, ref = _torch_topk(x, w, k)
                agree = (got == ref).all(-1).float().mean().item()
                fused = _time_graph(lambda: lm_head_topk(x, w, k, logprobs=k > 1))
                ref_ms = _time_graph(lambda: _torch_topk(x, w, k))
                gbps = w.numel() * w.element_size() / (fused * 1e-3) / 1e9
                r = Row(name, m, k, fused * 1e3, ref_ms * 1e3, ref_ms / fused, gbps, 100 * gbps * 1e9 / peak, agree)
                out.append(r)
                print(f"{r.head:<10} {m:>3} {k:>2} {r.fused_us:>9.2f} {r.torch_us:>9.2f} {r.speedup:>7.2f}x "
                      f"{r.gbps:>7.0f} {r.pct_copy_bw:>6.1f}% {r.agree:>6.2f}")
    sweep = _sweep() if args.sweep else []
    Path(args.out).write_text(json.dumps(
        {"gpu": gpu, "copy_bandwidth_bytes_per_s": peak, "rows": [asdict(r) for r in out], "sweep": sweep}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
