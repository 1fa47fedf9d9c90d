"""Kernel-level view of decode steps: for plain decode and for each speculative setting,
the wall time per engine step (no extra synchronisation inside the step), the GPU kernel
time and kernel count per step (torch.profiler), so a step is known to be launch-, kernel-
or host-bound, and the kernels that cost the most. Shapes are what matter: dummy weights
and a random EAGLE head are enough.

    python benchmarks/trace_step.py --preset smollm2-135m --batch 1 --specs none,eagle:chain,eagle:8x48

A spec is METHOD[:TREE][@POLICY]: e.g. `eagle:8x48@adaptive` (the policy defaults to fixed,
so every step drafts; adaptive shows what the measured policy makes of the same drafter).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_engine import PRESETS  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402


def random_head_dir(engine: Engine) -> str:
    from runtime.engine.speculative.eagle_head import EagleHead, save_head

    torch.manual_seed(0)
    head = EagleHead.for_target(engine.core.loaded.model).float()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = tempfile.mkdtemp(prefix="runtime-head-")
    save_head(out, head, {"target_model": engine.core.loaded.name})
    return out


def measure(engine: Engine, batch: int, steps: int, prompt_len: int, host_profile: bool = False) -> dict:
    core = engine.core
    vocab = core.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab - 100, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    engine.generate([p[:16] for p in prompts], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    reqs = [core.add_request(f"t{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)]
    while any(not r.output_ids for r in reqs):
        core.step()
    for _ in range(8):  # warm the decode path (graphs, drafter catch-up in steady state)
        core.step()
    torch.cuda.synchronize()
    before = sum(len(r.output_ids) for r in reqs)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    gained = (sum(len(r.output_ids) for r in reqs) - before) / steps / batch
    if host_profile:  # where the host's time goes (a sync shows up as time in tolist/item)
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    kernels: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] += ev.device_time
            count[ev.name] += 1
    for r in reqs:
        core.abort(r.rid)
    while core.has_work:
        core.step()
    gpu_us = sum(kernels.values()) / steps
    return dict(
        wall_ms=1e3 * wall, gpu_ms=gpu_us / 1e3, kernels=sum(count.values()) / steps,
        tokens_per_step=gained, ms_per_token=1e3 * wall / gained,
        top=[(name[:90], us / steps, count[name] / steps) for name, us in kernels.most_common(12)],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--specs", default="none,eagle:chain,eagle:8x48,ngram")
    ap.add_argument("--kv-cache-tokens", type=int, default=65536,
                    help="at least batch x (prompt-len + steps + 64), or the steps queue instead of decoding")
    ap.add_argument("--num-draft-tokens", type=int, default=5)
    ap.add_argument("--host-profile", action="store_true", help="also print a cProfile of the steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    folder = tempfile.mkdtemp(prefix=f"runtime-{a.preset}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(PRESETS[a.preset], f)
    base = dict(model=folder, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                kv_cache_tokens=a.kv_cache_tokens)
    head = None
    results = {}
    for spec in a.specs.split(","):
        name, _, policy = spec.partition("@")
        method, _, tree = name.partition(":")
        kw = dict(base)
        if method != "none":
            kw.update(speculative=method, num_draft_tokens=a.num_draft_tokens, speculative_policy=policy or "fixed")
        if method == "eagle":
            if head is None:
                probe = Engine(**base)
                head = random_head_dir(probe)
                probe.shutdown()
            kw.update(draft_model=head, speculative_tree=tree or "chain")
        engine = Engine(**kw)
        r = results[spec] = measure(engine, a.batch, a.steps, a.prompt_len, a.host_profile)
        engine.shutdown()
        torch.cuda.empty_cache()
        print(f"\n== {spec} (batch {a.batch}, attention {engine.core.attn.name}): wall {r['wall_ms']:.3f} ms/step, "
              f"GPU kernels {r['gpu_ms']:.3f} ms/step in {r['kernels']:.0f} launches, "
              f"{r['tokens_per_step']:.2f} tokens/step, {r['ms_per_token']:.3f} ms/token", flush=True)
        for name, us, n in r["top"]:
            print(f"   {us:8.1f} us  x{n:6.1f}  {name}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
