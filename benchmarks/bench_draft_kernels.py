"""The draft step's Triton kernels against the torch ops they replace, timed in CUDA graphs.

1. lm_head + top-k (runtime/kernels/lm_head_topk.py) against the torch ops a draft step used before: F.linear to [M, V] logits, then argmax (a chain's draft, k 1) or
topk and logsumexp (a tree's candidates, k > 1). Both sides are timed as a draft step runs
them: captured back to back in one CUDA graph (bench_fused_kernels._time_graph). The
achieved bandwidth is lm_head's bytes read once / the fused time, against the GPU's copy
bandwidth measured in the same run. "agree" is the fraction of rows whose k tokens equal
torch's, in order (they can differ on near-ties: torch rounds the logits to bf16 first).

2. A draft tree's bookkeeping (runtime/kernels/tree_grow.py, runtime/kernels/tree_select.py): TreeBuilder's
start, depth - 1 grows and the select, on the kernels and on its torch path; the work is
tiny, so this measures launches. "same" checks the two picks are identical.

    python benchmarks/bench_draft_kernels.py [--out bench_draft_kernels.json] [--sweep]

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
from runtime.kernels.lm_head_topk import lm_head_topk  # noqa: E402
from runtime.engine.speculative.tree import TreeBuilder  # noqa: E402

# (name, H, V): SmolLM2's full vocabulary, two draft vocabularies of it, Llama 3 8B's.
HEADS = [("smollm2", 576, 49152), ("smol-16k", 576, 16384), ("smol-8k", 576, 8192), ("llama3-8b", 4096, 128256)]
ROWS = (1, 8, 16, 64)  # a chain at batch 1, a tree level at batch 1, batch 16 chains, batch 8 trees
KS = (1, 8)
# (trees, branch, nodes, depth): batch 1 with the benchmarked trees, then batches 16 and 8.
TREES = [(1, 8, 48, 5), (1, 6, 32, 6), (1, 4, 16, 5), (16, 4, 16, 5), (8, 8, 48, 5)]


def _tree_build(kids: list[tuple[torch.Tensor, torch.Tensor]], branch: int, depth: int, nodes: int,
                kernels: bool) -> tuple[torch.Tensor, ...]:
    tb = TreeBuilder(branch, depth, kernels=kernels)
    tb.start(*kids[0])
    for k in kids[1:]:
        tb.grow(*k)
    return tb.select(nodes)


def _trees() -> list[dict]:
    """TreeBuilder with and without its kernels: us per tree built, and whether they agree."""
    print(f"\n{'trees':>5} {'tree':>6} {'depth':>5} {'kernels us':>11} {'torch us':>9} {'speedup':>8} {'same':>5}")
    found = []
    for n, b, nodes, depth in TREES:
        def logp(*shape: int) -> torch.Tensor:
            return (-torch.rand(*shape, device="cuda") * 6).sort(-1, descending=True).values

        kids = [(logp(n, b), torch.randint(0, 49152, (n, b), device="cuda"))]
        kids += [(logp(n, b, b), torch.randint(0, 49152, (n, b, b), device="cuda")) for _ in range(depth - 1)]
        same = all(torch.equal(a, c) for a, c in zip(_tree_build(kids, b, depth, nodes, True),
                                                      _tree_build(kids, b, depth, nodes, False)))
        fused = _time_graph(lambda: _tree_build(kids, b, depth, nodes, True), calls=10)
        ref = _time_graph(lambda: _tree_build(kids, b, depth, nodes, False), calls=10)
        found.append(dict(trees=n, branch=b, nodes=nodes, depth=depth, kernels_us=fused * 1e3, torch_us=ref * 1e3,
                          same=same))
        print(f"{n:>5} {f'{b}x{nodes}':>6} {depth:>5} {fused * 1e3:>11.1f} {ref * 1e3:>9.1f} {ref / fused:>7.2f}x "
              f"{str(same):>5}")
    return found


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


def _torch_topk(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The torch path the kernel replaced: tree.best_tokens for k 1 (an argmax over the
    bf16 logits, no values), tree.top_logprobs otherwise."""
    if k == 1:
        return None, F.linear(x, w).argmax(-1, keepdim=True)
    logits = F.linear(x, w).float()
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
    ap.add_argument("--out", default="bench_draft_kernels.json")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_draft_kernels: skipped, this benchmark needs a CUDA GPU")
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
    trees = _trees()
    sweep = _sweep() if args.sweep else []
    Path(args.out).write_text(json.dumps({"gpu": gpu, "copy_bandwidth_bytes_per_s": peak, "rows": [asdict(r) for r in out],
                                          "trees": trees, "sweep": sweep}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
