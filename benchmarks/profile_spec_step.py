"""Where a speculative decode step spends its time: mean wall time per call of the drafter's
phases, the target forward and acceptance, each bracketed by CUDA synchronisation (so the
sum exceeds an unprofiled step, which overlaps them). Batch 1, one 60-token prompt, 128 new
tokens; dummy weights are enough since only shapes matter.

    python benchmarks/profile_spec_step.py --model CONFIG_DIR --load-format dummy --head HEAD_DIR --tree chain
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import Engine, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--head", default=None, help="EAGLE head folder (none: plain decode)")
    ap.add_argument("--tree", default="chain")
    ap.add_argument("--num-draft-tokens", type=int, default=5)
    a = ap.parse_args()
    kw = {}
    if a.head:
        kw = dict(speculative="eagle", draft_model=a.head, num_draft_tokens=a.num_draft_tokens,
                  speculative_policy="fixed", speculative_tree=a.tree)
    engine = Engine(a.model, load_format=a.load_format, **kw)
    core = engine.core
    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    sync = torch.cuda.synchronize if core.device.type == "cuda" else (lambda: None)

    def wrap(obj: object, name: str) -> None:
        f = getattr(obj, name)

        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = f(*args, **kwargs)
            sync()
            total[name] += time.perf_counter() - t
            calls[name] += 1
            return out

        setattr(obj, name, timed)

    if core.drafter is not None:
        for name in ("propose", "observe", "_cache_pairs", "_grow"):
            if hasattr(core.drafter, name):
                wrap(core.drafter, name)
        wrap(core, "_accept")
    wrap(core.runner, "forward")
    wrap(core, "step")
    prompt = [[100 + i for i in range(60)]]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    engine.generate(prompt, params)  # warm-up (Triton compiles)
    total.clear()
    calls.clear()
    engine.generate(prompt, params)
    for name in total:
        print(f"{name:>14}: {1e3 * total[name] / calls[name]:7.2f} ms x {calls[name]}")
    engine.shutdown()


if __name__ == "__main__":
    main()
