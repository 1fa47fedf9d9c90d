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

The twelfth session's bench_spec run (H100, SmolLM2 real weights, chat, batch 16) found
adaptive's plain steps 1.43 ms (median) against no speculation's 1.15 and its drafting steps
1.95 against fixed's 1.67, while ngram-off here stayed at 1.01x of none. `--workload chat`
(bench_spec.py's chat prompts through the chat template, stopping at EOS) and the kinds
ngram-adaptive and ngram-fixed (the policy as it is) reproduce that case; every decode step
is then also keyed by the k it drafted and timed on the device (CUDA events around the
forward), so a slower step is told apart as host work or device work.

    python benchmarks/bench_spec_off.py --model MODEL [--load-format dummy] [--batch 16]
        [--rounds 2] [--repeats 3] [--max-tokens 256] [--device cuda]
        [--workload synthetic|chat|ragged] [--kinds none,ngram-off,ngram-on,ngram-adaptive,ngram-fixed]
        [--interleave --kv-cache-tokens N]

A kind followed by #N (e.g. `none#2`) is another engine of that kind: two engines that run the
same code measure the spread between instances, against which a kind's ratio is read.
`--interleave` builds a round's engines together and takes their repeats in turn, so drift
over time (clocks, the machine) falls on every kind alike.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime.engine.llm import Engine  # noqa: E402
from runtime.engine.request import SamplingParams  # noqa: E402
from bench_spec import CHAT, decode_outputs  # noqa: E402


KINDS = ("none", "ngram-off", "ngram-on", "ngram-adaptive", "ngram-fixed")
DEFAULT_KINDS = "none,ngram-off,ngram-on"


class Bench:
    """One engine of `kind`, instrumented: each `repeat()` runs the batch once and records its
    median step ms, wall seconds, and its decode steps (with the batch's bucket full: more
    than half its requests running) split by k: per k, steps and the median ms of the step,
    of each phase and of the forward on the device."""

    def __init__(self, a: argparse.Namespace, kind: str) -> None:
        self.a, self.kind = a, kind
        base = kind.split("#")[0]  # none#2: a second engine of a kind (the instance-to-instance spread)
        policy = {"ngram-fixed": "fixed"}.get(base, "adaptive")
        kw = {} if a.kv_cache_tokens is None else dict(kv_cache_tokens=a.kv_cache_tokens)
        self.eng = eng = Engine(a.model, device=a.device, dtype=a.dtype, load_format=a.load_format,
                                speculative="none" if base == "none" else "ngram", speculative_policy=policy,
                                num_draft_tokens=a.k, **kw)
        core = eng.core
        if base in ("ngram-off", "ngram-on"):
            k = 0 if base == "ngram-off" else a.k  # the policy's "off", or k, always
            core.policy.num_draft_tokens = lambda batch_size, finish=None: k
        self.medians: list[float] = []
        self.run_s: list[float] = []
        self.splits: list[dict] = []
        self.times: list[float] = []
        # Where a step's wall time goes, summed per step (no syncs added): drafting's decision,
        # the forward (the host's launches, or a graph's input copies and replay), sampling or a
        # drafting step's acceptance (which ends in the host read that waits for the device), and
        # the drafter's observe calls; "other": the rest of the step (scheduling, appending the
        # tokens, the policy's bookkeeping); "device": the forward's time on the GPU (CUDA events).
        phases = self.phases = {"propose": 0.0, "forward": 0.0, "sample": 0.0, "observe": 0.0}
        cuda = torch.cuda.is_available() and core.device.type == "cuda"
        events: list = []
        drafted = [0]
        self.steps_log: list[tuple[int, int, float, dict[str, float], float]] = []  # (batch, k, s, phases, device ms)

        def timed(owner, name: str, phase: str) -> None:
            inner_fn = getattr(owner, name)

            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    out = inner_fn(*args, **kwargs)
                finally:
                    phases[phase] += time.perf_counter() - t0
                if name == "_propose_or_skip":
                    drafted[0] = out[1] or 0
                return out

            setattr(owner, name, wrapper)

        inner_forward = core.runner.forward

        def forward(*args, **kwargs):
            if not cuda:
                return inner_forward(*args, **kwargs)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = inner_forward(*args, **kwargs)
            e1.record()
            events.append((e0, e1))
            return out

        core.runner.forward = forward
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
            events.clear()
            drafted[0] = 0
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            dt = time.perf_counter() - t0
            self.times.append(dt)
            live = decode_outputs(out)
            if live:
                dev = sum(e0.elapsed_time(e1) for e0, e1 in events) if events else 0.0  # synced by the host read
                self.steps_log.append((len(live), drafted[0], dt, dict(phases), dev))
            return out

        core.step = step
        if a.workload == "chat":
            self.params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
            self.prompts = [eng.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT[: a.batch]]
        elif a.workload == "ragged":
            # chat's shape without real weights: its prompts, and requests that end at spread
            # lengths (a quarter of max_tokens up to all of it) as at EOS, so the batch thins
            # out step by step as a chat batch does.
            self.params = [SamplingParams(max_tokens=max(1, a.max_tokens * (4 + (7 * i) % 13) // 16), temperature=0.0,
                                          ignore_eos=True) for i in range(a.batch)]
            self.prompts = [eng.apply_chat_template([{"role": "user", "content": p}])
                            for p in (CHAT * (a.batch // len(CHAT) + 1))[: a.batch]]
        else:
            self.params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
            self.prompts = [f"Request {i}: tell me about the number {i} and why it matters." for i in range(a.batch)]
        eng.generate(self.prompts, self.params)  # warm-up

    def repeat(self) -> None:
        self.times.clear()
        self.steps_log.clear()
        t0 = time.perf_counter()
        self.eng.generate(self.prompts, self.params)
        self.run_s.append(time.perf_counter() - t0)
        self.medians.append(1e3 * statistics.median(self.times))
        full = self.a.batch // 2  # decode steps with more than this many requests: the batch's own bucket
        split: dict = {}
        for k in sorted({x[1] for x in self.steps_log}):
            sel = [x for x in self.steps_log if x[1] == k and x[0] > full]
            if sel:
                split[f"k{k}"] = dict(
                    steps=len(sel), step_ms=1e3 * statistics.median(x[2] for x in sel),
                    device_ms=statistics.median(x[4] for x in sel),
                    **{p: 1e3 * statistics.median(x[3][p] for x in sel) for p in self.phases},
                    other=1e3 * statistics.median(x[2] - sum(x[3].values()) for x in sel))
        self.splits.append(split)

    def report(self, r: int) -> dict:
        print(f"round {r} {self.kind:<14} median step ms per repeat: " + " ".join(f"{m:.3f}" for m in self.medians)
              + "; run s: " + " ".join(f"{x:.3f}" for x in self.run_s), flush=True)
        for key, v in self.splits[-1].items():  # the last repeat's decode steps in the full bucket, by k
            print(f"    {key:<3} " + " ".join(f"{p} {x:.3f}" if isinstance(x, float) else f"{p} {x}"
                                          for p, x in v.items()), flush=True)
        return dict(round=r, kind=self.kind, step_ms_medians=self.medians, by_k=self.splits, run_s=self.run_s)

    def profile(self) -> None:
        """One more repeat under torch.profiler: the host's heaviest ops (self time) and the
        device's kernels (self time), per decode-or-prefill step of the repeat."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            self.repeat()  # clears self.times first: it then holds this repeat's steps
        steps = max(1, len(self.times))
        ev = prof.key_averages()
        print(f"== profile {self.kind}: {steps} steps", flush=True)
        kinds = (("self_cpu_time_total", "host"),) + ((("self_device_time_total", "device"),) if len(acts) > 1 else ())
        for key, label in kinds:
            rows = sorted(ev, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
            total = sum(getattr(e, key, 0.0) for e in ev)
            print(f"   {label}: {total / steps:.1f} us per step; heaviest (us per step, calls per step):")
            for e in rows:
                print(f"      {getattr(e, key, 0.0) / steps:9.1f} {e.count / steps:6.1f}  {e.key[:90]}")

    def close(self) -> None:
        self.eng.shutdown()
        self.eng = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    ap.add_argument("--workload", choices=("synthetic", "chat", "ragged"), default="synthetic",
                    help="synthetic: like prompts, ignore_eos; chat: bench_spec.py's chat prompts, stopping at EOS; "
                    "ragged: chat's prompts, ignore_eos, lengths spread from max_tokens / 4 to max_tokens (dummy "
                    "weights suffice)")
    ap.add_argument("--kinds", default=DEFAULT_KINDS, help=f"comma-separated, none first (of {', '.join(KINDS)})")
    ap.add_argument("--interleave", action="store_true", help="build a round's engines together and take their "
                    "repeats in turn (needs --kv-cache-tokens on a GPU: each pool would take the free memory)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="--interleave: then one more repeat of each kind under "
                    "torch.profiler (host ops and device kernels per step)")
    ap.add_argument("--out", default="bench_spec_off.json")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    if kinds[0] != "none" or not {k.split("#")[0] for k in kinds} <= set(KINDS):
        ap.error(f"--kinds: none first, then any of {', '.join(KINDS[1:])}")
    rows = []
    for r in range(a.rounds):
        if a.interleave:
            # Every kind alive at once, their repeats taken in turn: clocks and drift between
            # repeats fall on all kinds alike (KV pools sized by --kv-cache-tokens, so they fit).
            benches = [Bench(a, kind) for kind in kinds]
            for _ in range(a.repeats):
                for b in benches:
                    b.repeat()
            rows += [b.report(r) for b in benches]
            if a.profile:
                for b in benches:
                    b.profile()
            for b in benches:
                b.close()
            continue
        for kind in kinds:
            b = Bench(a, kind)
            for _ in range(a.repeats):
                b.repeat()
            rows.append(b.report(r))
            b.close()
    best = {k: min(min(x["step_ms_medians"]) for x in rows if x["kind"] == k) for k in kinds}
    print("best median step: " + ", ".join(f"{k} {v:.3f} ms ({v / best['none']:.3f}x)" for k, v in best.items()))
    runs = {k: min(min(x["run_s"]) for x in rows if x["kind"] == k) for k in kinds}
    print("best run: " + ", ".join(f"{k} {v:.3f} s ({runs['none'] / v:.3f}x none's speed)" for k, v in runs.items()))
    Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows, best=best, best_run_s=runs), indent=2))


if __name__ == "__main__":
    main()
