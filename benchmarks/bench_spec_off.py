"""What an engine built for speculation pays on steps that do not draft (issue 18).

The eleventh session's H100 run of bench_spec.py found adaptive's plain steps (k = 0) 14-15%
slower than the no-speculation engine's at the same batch (SmolLM2, batch 16: 1.427 against
1.247 ms; batch 64: 1.726 against 1.498), which alone breaks the 0.97x contract wherever the
policy chooses not to draft. Whether that is the speculative engine's own work or drift
between engines built one after another in one process was not measured. Here engines of
the kinds are built alternately (none, ngram-off, ngram-on, none, ...): ngram-off's policy
told never to draft, ngram-on's to draft k every step (the steady state a fixed policy
reaches, against which adaptive's probe steps can be read; the eleventh session's trace
averaged them with the drafter's catch-up steps, 2.449 ms against fixed's 1.543), and
each runs the same greedy batch (ignore_eos) several times: the median step time per
engine, each decode step split into phases, and the ratio of each kind's best run to none's.

    python benchmarks/bench_spec_off.py --model MODEL [--load-format dummy] [--batch 16]
        [--rounds 2] [--repeats 3] [--max-tokens 256] [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.engine.llm import Engine  # noqa: E402
from runtime.engine.request import SamplingParams  # noqa: E402


KINDS = ("none", "ngram-off", "ngram-on")


def run_engine(a: argparse.Namespace, kind: str, split_log: list[dict[str, float]]) -> list[float]:
    """Median step ms of each repeat of one batch on a fresh engine of `kind`; each repeat's
    median ms per phase of its decode steps is appended to split_log."""
    eng = Engine(a.model, device=a.device, dtype=a.dtype, load_format=a.load_format,
                 speculative="none" if kind == "none" else "ngram", speculative_policy="adaptive",
                 num_draft_tokens=a.k)
    core = eng.core
    if kind != "none":
        k = 0 if kind == "ngram-off" else a.k  # the policy's "off", or k, always
        core.policy.num_draft_tokens = lambda batch_size, finish=None: k
    times: list[float] = []
    # Where a step's wall time goes, summed per step (no syncs added): drafting's decision,
    # the forward (the host's launches, or a graph's input copies and replay), sampling or a
    # drafting step's acceptance (which ends in the host read that waits for the device), and
    # the drafter's observe calls.
    phases = {"propose": 0.0, "forward": 0.0, "sample": 0.0, "observe": 0.0}
    phase_steps: list[dict[str, float]] = []

    def timed(owner, name: str, phase: str) -> None:
        inner_fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner_fn(*args, **kwargs)
            finally:
                phases[phase] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(core.runner, "forward", "forward")
    timed(core, "_sample", "sample")
    timed(core, "_accept", "sample")  # a drafting step's acceptance in place of sampling
    if core.drafter is not None:
        timed(core, "_propose_or_skip", "propose")
        timed(core.drafter, "observe", "observe")
    inner = core.step

    def step(*args, **kwargs):
        for k in phases:
            phases[k] = 0.0
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        phase_steps.append(dict(phases))
        return out

    core.step = step
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"Request {i}: tell me about the number {i} and why it matters." for i in range(a.batch)]
    eng.generate(prompts, params)  # warm-up
    medians = []
    for _ in range(a.repeats):
        times.clear()
        phase_steps.clear()
        eng.generate(prompts, params)
        medians.append(1e3 * statistics.median(times))
        # Decode steps only: the batch's steps after its prefill, each with every request.
        decode = phase_steps[len(phase_steps) // 4:]
        split = {k: 1e3 * statistics.median(p[k] for p in decode) for k in phases}
        split_log.append(split)
    eng.shutdown()
    del eng, core, inner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="ngram-on's draft tokens per step")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="engines of each kind, built alternately")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per engine")
    ap.add_argument("--out", default="bench_spec_off.json")
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        for kind in KINDS:
            split: list[dict[str, float]] = []
            medians = run_engine(a, kind, split)
            rows.append(dict(round=r, kind=kind, step_ms_medians=medians, phase_ms_medians=split))
            print(f"round {r} {kind:<9} median step ms per repeat: " + " ".join(f"{m:.3f}" for m in medians)
                  + "; phases of the last: " + " ".join(f"{k} {v:.3f}" for k, v in split[-1].items()), flush=True)
    best = {k: min(min(x["step_ms_medians"]) for x in rows if x["kind"] == k) for k in KINDS}
    print("best median step: " + ", ".join(f"{k} {v:.3f} ms ({v / best['none']:.3f}x)" for k, v in best.items()))
    Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows, best=best), indent=2))


if __name__ == "__main__":
    main()
