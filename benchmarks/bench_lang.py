"""runtime.lang: a 4-way fork after a long shared prompt against the same four requests
sent without sharing (prefix cache off), on an in-process Engine, in one run.

    python benchmarks/bench_lang.py                                   # SmolLM2, device auto
    python benchmarks/bench_lang.py --device cpu --prompt-tokens 1000 --max-tokens 16

Rows (greedy, ignore_eos, --max-tokens per branch):
  fork     `s += prompt; forks = s.fork(4); forks[i] += gen(...)` through EngineBackend on an
           engine with the radix cache: the prompt is computed once (fork's cache_prefix),
           each branch computes only its own suffix (and the prompt's last partial page)
  nocache  the same four prompts (prompt + the branch's text) in one Engine.generate call on
           an engine with prefix_cache=False: every branch computes the whole prompt
`prefill` is the prompt tokens computed (prompt tokens minus cache hits, the fork's one
prompt pass included); tok/s is generated tokens over wall time (prefill included), and
`time` the whole run. A warm-up of each path runs first. Prints a table, writes JSON (--out)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.lang import EngineBackend, function, gen  # noqa: E402

BRANCHES = 4
SENTENCE = "The cache keeps the keys and values of every layer so that decoding is fast. "


def long_prompt(engine: Engine, tokens: int) -> str:
    text = ""
    while len(engine.tokenizer(text)["input_ids"]) < tokens:
        text += SENTENCE
    return text


@function
def fan_out(s, prompt: str, max_tokens: int, branches: list):
    s += prompt
    forks = s.fork(BRANCHES)
    for i, f in enumerate(forks):
        f += f"Branch {i}:" + gen("out", max_tokens=max_tokens, ignore_eos=True)
    s.join(forks)
    branches.extend(forks)


def run_fork(backend: EngineBackend, prompt: str, max_tokens: int) -> dict:
    backend.engine.core.cache.reset()  # each run starts cold: the fork itself must share
    branches: list = []
    t0 = time.perf_counter()
    fan_out.run(prompt=prompt, max_tokens=max_tokens, branches=branches, backend=backend)
    elapsed = time.perf_counter() - t0
    metas = [f.get_meta_info("out") for f in branches]
    prompt_ids = len(backend.engine.tokenizer(prompt)["input_ids"])
    prefill = prompt_ids + sum(m["prompt_tokens"] - m["cached_tokens"] for m in metas)
    generated = sum(m["completion_tokens"] for m in metas)
    return {"time_s": elapsed, "prefill_tokens": prefill, "generated": generated, "tok_s": generated / elapsed,
            "cached_tokens": [m["cached_tokens"] for m in metas]}


def run_nocache(engine: Engine, prompt: str, max_tokens: int) -> dict:
    prompts = [prompt + f"Branch {i}:" for i in range(BRANCHES)]
    t0 = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    generated = sum(len(r.token_ids) for r in results)
    return {"time_s": elapsed, "prefill_tokens": sum(r.prompt_tokens - r.cached_tokens for r in results),
            "generated": generated, "tok_s": generated / elapsed, "cached_tokens": [r.cached_tokens for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="bench_lang.json")
    a = p.parse_args()
    shared = Engine(a.model, device=a.device, dtype=a.dtype)
    plain = Engine(a.model, device=a.device, dtype=a.dtype, prefix_cache=False)
    backend = EngineBackend(shared)
    prompt = long_prompt(shared, a.prompt_tokens)
    run_fork(backend, prompt, 2)  # warm-up
    run_nocache(plain, prompt, 2)
    rows = {"fork": run_fork(backend, prompt, a.max_tokens), "nocache": run_nocache(plain, prompt, a.max_tokens)}
    backend.close()
    n_prompt = len(shared.tokenizer(prompt)["input_ids"])
    print(f"{shared.core.loaded.name} on {shared.core.device}, prompt {n_prompt} tokens, {BRANCHES} branches x "
          f"{a.max_tokens} tokens")
    print(f"{'row':8} {'prefill':>8} {'generated':>9} {'time s':>8} {'tok/s':>8}  cached per branch")
    for name, r in rows.items():
        print(f"{name:8} {r['prefill_tokens']:8d} {r['generated']:9d} {r['time_s']:8.2f} {r['tok_s']:8.1f}  "
              f"{r['cached_tokens']}")
    speedup = rows["nocache"]["time_s"] / rows["fork"]["time_s"]
    print(f"fork vs nocache: {speedup:.2f}x faster, {rows['nocache']['prefill_tokens'] / rows['fork']['prefill_tokens']:.2f}x "
          "fewer prefill tokens")
    with open(a.out, "w") as f:
        json.dump({"model": shared.core.loaded.name, "device": str(shared.core.device), "prompt_tokens": n_prompt,
                   "branches": BRANCHES, "max_tokens": a.max_tokens, "rows": rows, "speedup": speedup}, f, indent=2)
    shared.shutdown()
    plain.shutdown()


if __name__ == "__main__":
    main()
