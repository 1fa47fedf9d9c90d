"""Speculative decoding: tokens/s and mean accept length per drafter, workload and batch
size, against no speculation in the same run.

    python benchmarks/bench_spec.py --model SMOL_DIR --draft-model DRAFT_DIR --eagle EAGLE_DIR

Workloads: `chat` (open-ended instructions through the chat template) and `copy` (rewrite a
given passage with one word changed: long verbatim runs, where n-gram lookup shines).
Batch size B runs all 16 prompts of a workload, in groups of B one after another (B=1:
each prompt alone); B above 16 repeats the prompts in turn up to B. Generation stops at EOS, as a chat user sees it, unless --ignore-eos;
tokens/s counts the tokens generated.
`make-draft` writes a smaller same-tokenizer draft model: the target's first N layers."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.engine.speculative.train_prompts import make_prompts  # noqa: E402

CHAT = [
    "Explain how a refrigerator works.", "Write a short poem about the sea.", "What are the benefits of exercise?",
    "Describe the water cycle.", "Give me three tips for learning a language.", "Why is the sky blue?",
    "How do airplanes fly?", "Summarize the plot of a heist movie.", "What is machine learning?",
    "Write a haiku about autumn.", "How do I bake bread?", "What causes earthquakes?",
    "Describe a busy market.", "Explain photosynthesis simply.", "What is a black hole?", "How do vaccines work?",
]
PASSAGE = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salty wind. "
           "Every evening the keeper climbed the spiral stairs, lit the great lamp, and watched the ships pass "
           "safely through the narrow channel between the rocks. In winter the storms came from the north, "
           "and the waves rose so high that spray reached the windows of the lamp room. The keeper kept a "
           "logbook of every ship, every storm and every visitor, and the villagers said that no vessel had "
           "been lost on those rocks for as long as the light had burned. ")
COPY = [f"Rewrite the following text exactly, but change the word 'old' to '{w}':\n\n{PASSAGE}" for w in (
    "ancient", "tall", "lonely", "famous", "small", "broken", "quiet", "distant",
    "grey", "proud", "forgotten", "crooked", "mighty", "humble", "weathered", "silent")]


def make_draft(target: str, out: str, layers: int) -> None:
    """The target's first `layers` decoder layers plus its embeddings, norm and head."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(target)
    cfg.num_hidden_layers = layers
    os.makedirs(out, exist_ok=True)
    cfg.save_pretrained(out)
    AutoTokenizer.from_pretrained(target).save_pretrained(out)
    state = load_file(os.path.join(target, "model.safetensors"))
    keep = {k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, os.path.join(out, "model.safetensors"))


MAX_REPEATS = 15  # timed_generate: the most runs a group gets to fill min_seconds


def timed_generate(engine: Engine, prompts: list, batch: int, params: SamplingParams | list[SamplingParams],
                   repeats: int = 1, min_seconds: float = 0.0, base: Engine | None = None,
                   base_out: list | None = None) -> tuple[list, float, int]:
    """Every prompt, in groups of `batch` run one after another (a group finishes before the
    next starts): the results, the wall time and the engine forwards summed over the groups.
    `params`: one for all, or one per prompt.
    With repeats > 1 each group is timed that many times and its median time counts (a batch
    of 16 x 256 tokens of a small model is ~0.3 s on a GPU, where one run's noise is ~10%),
    and more times (up to MAX_REPEATS) until the group's runs took min_seconds in all.
    `base`: another engine that runs the group too, each of its runs just before one of
    `engine`'s (paired runs: drift over time falls on both alike); its results and median
    time per group are appended to `base_out` as (results, seconds)."""
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    cuda = engine.core.device.type == "cuda"
    warmed: set[tuple[int, ...]] = set()
    dt, forwards, res = 0.0, 0, []
    per = params if isinstance(params, list) else [params] * len(prompts)
    for g, group in enumerate(groups):
        gp = per[g * batch : g * batch + len(group)]
        # Warm-up on the same prompt lengths: Triton compiles a kernel variant the first
        # time a shape class appears (e.g. one split vs several), which must not be timed.
        shape = tuple(len(p) for p in group)
        if shape not in warmed:
            engine.generate(group, gp)
            if base is not None:
                base.generate(group, gp)
            warmed.add(shape)
        if cuda:
            torch.cuda.synchronize()
        times: list[float] = []
        base_times: list[float] = []
        while len(times) < repeats or (sum(times) < min_seconds and len(times) < MAX_REPEATS):
            if base is not None:
                t0 = time.perf_counter()
                base_res = base.generate(group, gp)
                if cuda:
                    torch.cuda.synchronize()
                base_times.append(time.perf_counter() - t0)
            f0, t0 = engine.core.num_forwards, time.perf_counter()
            out = engine.generate(group, gp)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res += out
        dt += sorted(times)[len(times) // 2]
        if base is not None:
            base_out.append((base_res, sorted(base_times)[len(base_times) // 2]))
        forwards += engine.core.num_forwards - f0
    return res, dt, forwards


class PolicyTrace:
    """Every step the speculation policy is told about (batch size, k, seconds, tokens gained
    per request), recorded around the engine's policy: what adaptive decided, step by step,
    and what each choice cost."""

    def __init__(self, engine: Engine) -> None:
        self.policy = engine.core.policy
        self.steps: list[tuple[int, int | str, float, float]] = []
        last_k: dict[int, int] = {}  # per bucket: k of the last step recorded
        inner = self.policy.record_step

        def record_step(batch_size: int, k: int, seconds: float, tokens: float) -> None:
            # A drafting step right after plain ones is the drafter's catch-up, which the
            # policy keeps out of drafting's estimate (a cost of probing): listed apart, as kNc.
            b = self.policy.bucket(batch_size)
            key = f"{k}c" if k and not last_k.get(b, 0) else k
            last_k[b] = k
            self.steps.append((batch_size, key, seconds, tokens))
            inner(batch_size, k, seconds, tokens)

        self.policy.record_step = record_step

    def take(self) -> dict:
        """Per bucket and k (kNc: catch-up steps): steps, mean and median step ms, mean tokens
        per request, tokens/request/s; then forget."""
        by: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for b, k, sec, tok in self.steps:
            by.setdefault((self.policy.bucket(b), str(k)), []).append((sec, tok))
        self.steps = []
        out = {}
        for (b, k), xs in sorted(by.items()):
            sec = sum(x[0] for x in xs) / len(xs)
            tok = sum(x[1] for x in xs) / len(xs)
            out[f"b{b}k{k}"] = dict(steps=len(xs), step_ms=round(1000 * sec, 3),
                                   median_ms=round(1000 * statistics.median(x[0] for x in xs), 3),
                                   tokens=round(tok, 3), rate=round(tok / sec, 1))
        # Per bucket, since the engine was built: decisions finish_gain turned.
        for b in sorted({b for b, _ in by}):
            out[f"b{b}_finish_decided"] = self.policy.finish_decided(b)
        return out


def decode_outputs(outs: list) -> list:
    """The step's outputs that gained tokens, if it was a decode step (none gave a request
    its first token, which would mean it ran that request's prefill); else []."""
    live = [o for o in outs if o.new_token_ids]
    return live if all(len(o.req.output_ids) > len(o.new_token_ids) for o in live) else []


class StepTrace:
    """Every engine decode step (no prefill in it), by batch size bucket: steps, mean wall ms,
    tokens per request. For every method (no speculation included), so adaptive's plain
    and drafting steps can be set against no speculation's and fixed's."""

    def __init__(self, engine: Engine) -> None:
        core = engine.core
        self.steps: list[tuple[int, float, float]] = []
        inner = core.step

        def step(*args, **kwargs):
            t0 = time.perf_counter()
            outs = inner(*args, **kwargs)
            dt = time.perf_counter() - t0
            live = decode_outputs(outs)
            if live:
                self.steps.append((len(live), dt, sum(len(o.new_token_ids) for o in live) / len(live)))
            return outs

        core.step = step

    def take(self) -> dict:
        by: dict[int, list[tuple[float, float]]] = {}
        for n, dt, tok in self.steps:
            by.setdefault(1 << max(0, n - 1).bit_length(), []).append((dt, tok))
        self.steps = []
        # The mean (what the policy weighs) and the median (what a few slow outliers do not move).
        return {f"b{b}": dict(steps=len(xs), step_ms=round(1000 * sum(x[0] for x in xs) / len(xs), 3),
                              median_ms=round(1000 * statistics.median(x[0] for x in xs), 3),
                              tokens=round(sum(x[1] for x in xs) / len(xs), 3))
                for b, xs in sorted(by.items())}


def run(engine: Engine, prompts: list[list[int]], batch: int, max_tokens: int,
        ignore_eos: bool, trace: PolicyTrace | None = None,
        steps: StepTrace | None = None, repeats: int = 1, min_seconds: float = 0.0,
        base: Engine | None = None) -> tuple[dict, list[list[int]]]:
    """timed_generate's tokens/s; accept length the mean over all requests. With `base`
    (paired runs) also the base engine's tokens/s over the same runs' turns, and their ratio."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    if batch > len(prompts):  # a batch bigger than the workload: its prompts again, in turn
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
    base_out: list = []
    res, dt, _ = timed_generate(engine, prompts, batch, params, repeats, min_seconds, base, base_out)
    n = sum(len(r.token_ids) for r in res)  # what was generated: fewer than max_tokens at EOS
    stats = dict(tok_s=n / dt, accept_length=sum(r.accept_length for r in res) / len(res), seconds=dt,
                 tokens=n, requests=len(res))
    if base is not None:
        base_n = sum(len(r.token_ids) for out, _ in base_out for r in out)
        base_tok_s = base_n / sum(sec for _, sec in base_out)
        stats.update(base_tok_s=base_tok_s, paired_speedup=stats["tok_s"] / base_tok_s)
    if trace is not None:
        stats["policy_steps"] = trace.take()  # warm-up and timed runs together
    if steps is not None:
        stats["engine_steps"] = steps.take()  # warm-up and timed runs together
    return stats, [r.token_ids for r in res]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", nargs="?", default="bench", choices=("bench", "make-draft"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--eagle", default=None, help="EAGLE head folder(s), comma-separated (each is its own method)")
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens (default: stop "
                    "at EOS, as a chat user sees)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--ngram-draft-tokens", type=int, default=None, help="k for ngram (default: --num-draft-tokens)")
    ap.add_argument("--eagle-draft-tokens", type=int, default=None, help="k (tree depth) for eagle (default: --num-draft-tokens)")
    ap.add_argument("--eagle-trees", default="chain", help="eagle runs, comma-separated --speculative-tree values (chain, BxN)")
    ap.add_argument("--methods", default="none,ngram,draft,eagle", help="subset to run (draft/eagle need their paths)")
    ap.add_argument("--workloads", default="chat,copy", help="chat, copy, and train: prompts of the train-draft "
                    "templates (in-distribution, may repeat training prompts): tells a serving gap from a prompt shift")
    ap.add_argument("--policies", default="fixed", help="speculative policies to run each drafter under "
                    "(fixed, adaptive; comma-separated)")
    ap.add_argument("--trace-policy", action="store_true", help="under adaptive, record every step the policy "
                    "weighs (per bucket and k: steps, step ms, tokens per request) into the rows, and for every method "
                    "the engine's steps per batch bucket")
    ap.add_argument("--repeats", type=int, default=3, help="time each group this many times; the median counts")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="... and more times (up to 15) until its runs "
                    "took this long in all (a 64 x 256-token group of SmolLM2 is ~0.2 s on a GPU)")
    ap.add_argument("--control", action="store_true", help="run no speculation again after every other method "
                    "(row none#2): the drift between engines of one run, against which a speedup near 1 is read")
    ap.add_argument("--paired", action="store_true", help="keep a no-speculation engine alive beside each method's "
                    "and time it just before each of the method's runs (speedup from the paired runs; the row "
                    "none is then a second no-speculation engine: the spread between instances)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool per engine (needed with --paired on "
                    "a GPU: each engine's pool would otherwise take the free memory)")
    ap.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=True,
                    help="every engine with the overlap schedule, the default (the baseline's plain steps "
                    "overlapped; speculative engines overlap where they do not draft)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="e.g. float32 to check exactness without bf16 rounding")
    ap.add_argument("--out", default="bench_spec.json")
    a = ap.parse_args()
    if a.command == "make-draft":
        make_draft(a.model, a.out_dir, a.draft_layers)
        return
    wanted = a.methods.split(",")
    methods = [(m, p, "chain") for m, p in (("none", None), ("ngram", None), ("draft", a.draft_model))
               if m in wanted and (m in ("none", "ngram") or p)]
    if "eagle" in wanted and a.eagle:  # several heads: eagle, eagle#2, ... in the order given
        methods += [("eagle" if j == 0 else f"eagle#{j + 1}", path, tree)
                    for j, path in enumerate(a.eagle.split(",")) for tree in a.eagle_trees.split(",")]
    if methods[0][0] != "none":
        ap.error("--methods must include none (the baseline)")
    policies = a.policies.split(",")
    runs = [(m, d, t, p) for m, d, t in methods for p in (["fixed"] if m == "none" else policies)]
    if a.control:
        runs.append(("none#2", None, "chain", "fixed"))
    rows = []
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    kv = {} if a.kv_cache_tokens is None else dict(kv_cache_tokens=a.kv_cache_tokens)
    kv["overlap_schedule"] = a.overlap_schedule
    base_engine = Engine(a.model, device=a.device, dtype=a.dtype, **kv) if a.paired else None
    for method, draft, tree, policy in runs:
        k = {"ngram": a.ngram_draft_tokens, "eagle": a.eagle_draft_tokens}.get(method.split("#")[0]) or a.num_draft_tokens
        engine = Engine(a.model, device=a.device, dtype=a.dtype, speculative=method.split("#")[0], draft_model=draft,
                        num_draft_tokens=k, speculative_policy=policy, speculative_tree=tree, **kv)
        if tree != "chain":
            method = f"{method}-{tree}"
        if policy != "fixed":
            method = f"{method}@{policy}"
        tok = engine.tokenizer
        trace = PolicyTrace(engine) if policy == "adaptive" and a.trace_policy else None
        steps = StepTrace(engine) if a.trace_policy else None
        sources = {"chat": CHAT, "copy": COPY, "train": make_prompts(16, seed=987_654)}
        workloads = {name: [engine.apply_chat_template([{"role": "user", "content": p}]) for p in sources[name]]
                     for name in a.workloads.split(",")}
        for wl, prompts in workloads.items():
            for bs in (int(x) for x in a.batch_sizes.split(",")):
                r, toks = run(engine, prompts, bs, a.max_tokens, a.ignore_eos, trace, steps, a.repeats,
                              a.min_seconds, base_engine)
                # Greedy speculation is exact; in bf16 a row batched differently can round
                # differently, so report how many outputs equal no-speculation's.
                ref = outputs.setdefault((wl, bs), toks)
                same = sum(x == y for x, y in zip(toks, ref)) / len(ref)
                rows.append(dict(method=method, workload=wl, batch=bs, k=k, same_as_none=same, **r))
                if method == "none" and bs > 1:
                    # Control: the same prompts in groups of half the size, no speculation;
                    # the match rate bf16 rounding alone gives.
                    _, half = run(engine, prompts, bs // 2, a.max_tokens, a.ignore_eos)
                    if steps is not None:
                        steps.take()  # not the next row's
                    rows[-1]["same_half_batch"] = sum(x == y for x, y in zip(half, toks)) / len(half)
                print(json.dumps(rows[-1]), flush=True)
        del tok
        engine.shutdown()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if base_engine is not None:
        base_engine.shutdown()
    base = {(r["workload"], r["batch"]): r["tok_s"] for r in rows if r["method"] == "none"}
    for r in rows:
        r["speedup"] = r["tok_s"] / base[(r["workload"], r["batch"])]
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", rows=rows), f, indent=2)
    print(f"\n{'method':>16} {'k':>3} {'workload':>8} {'batch':>5} {'accept len':>10} {'tok/s':>9} {'speedup':>8} {'same':>5}"
          + (f" {'paired':>7}" if a.paired else "") + f"   (ignore_eos={a.ignore_eos}, max_tokens={a.max_tokens})")
    for r in rows:
        print(f"{r['method']:>16} {r['k']:>3} {r['workload']:>8} {r['batch']:>5} {r['accept_length']:10.2f} "
              f"{r['tok_s']:9.1f} {r['speedup']:7.2f}x {r['same_as_none']:5.2f}"
              + (f" {r['paired_speedup']:6.2f}x" if a.paired else ""))


if __name__ == "__main__":
    main()
