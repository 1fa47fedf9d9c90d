"""Host work of a decode step that the GPU waits for, measured on the host alone (no GPU).

1. The decode graphs' page table: every step the host writes each row's page list into the
   pinned table the graph reads. Written whole (the previous code: a numpy row assignment
   per sequence) against page_table.PageTableRows (only what changed since the last step),
   on a steady decode: B sequences of ~1,150 tokens in pages of 16, each gaining a page every
   16 steps (staggered), one sequence in 64 finishing and replaced per step.
2. The garbage collector: a full collection of an engine process (the tiny model) before
   and after gc_heap.freeze_startup_heap, which every server process now calls at start.
3. The rest of the engine's step on the host: EngineCore.step with the model's forward
   replaced by zeros (scheduler, row building, sampling, appending), per batch size, plain
   and with the overlap schedule (on a CPU nothing overlaps: this is its bookkeeping's cost).

    python benchmarks/bench_host_step.py --batch-sizes 1,64,256

Prints a table and writes JSON (--out)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.engine.page_table import PageList, PageTableRows  # noqa: E402


def page_table_fill(batch: int, steps: int, pages: int, seed: int = 0) -> dict:
    """ms per step writing the table whole and incrementally, over the same sequence of steps."""
    rng = random.Random(seed)
    counter = iter(range(10**9))
    seqs = [PageList(next(counter) for _ in range(pages + rng.randint(-8, 8))) for _ in range(batch)]
    plan = []  # per step: (rows that gain a page, row replaced or None)
    for step in range(steps):
        grow = [i for i in range(batch) if (i + step) % 16 == 0]
        plan.append((grow, rng.randrange(batch) if rng.random() < batch / 64 / 16 else None))
    max_pages = pages + 64

    def run(fill) -> float:
        state = [PageList(p) for p in seqs]
        times = []
        for grow, replace in plan:
            for i in grow:
                state[i].append(next(counter))
            if replace is not None:
                state[replace] = PageList(next(counter) for _ in range(pages))
            t0 = time.perf_counter()
            fill(state)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    whole = np.zeros((batch, max_pages), dtype=np.int32)

    def fill_whole(lists):  # the code before page_table.py
        for i, p in enumerate(lists):
            whole[i, : len(p)] = p

    rows = PageTableRows(np.zeros((batch, max_pages), dtype=np.int32))
    return dict(batch=batch, pages=pages, whole_ms=run(fill_whole), incremental_ms=run(rows.fill))


def gc_full_collection(model_dir: str) -> dict:
    from runtime import Engine
    from runtime.common.gc_heap import freeze_startup_heap

    eng = Engine(model_dir, device="cpu", dtype="float32")
    tracked = len(gc.get_objects())
    t0 = time.perf_counter()
    gc.collect()
    before = time.perf_counter() - t0
    freeze_startup_heap("bench")
    t0 = time.perf_counter()
    gc.collect()
    after = time.perf_counter() - t0
    gc.unfreeze()
    eng.shutdown()
    return dict(tracked_objects=tracked, full_collect_ms=before * 1e3, after_freeze_ms=after * 1e3)


def engine_host_step(model_dir: str, batch: int, steps: int, overlap: bool = False) -> dict:
    from runtime import Engine, SamplingParams
    from runtime.engine.runner import ForwardOut, build_rows

    eng = Engine(model_dir, device="cpu", dtype="float32", kv_cache_tokens=batch * 1200, max_running=batch,
                 overlap_schedule=overlap)
    core = eng.core
    vocab, hidden = core.model_config.vocab_size, core.model_config.hidden_size
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    reqs = [core.add_request(f"r{i}", torch.randint(10, vocab - 10, (64,), generator=g).tolist(), params)
            for i in range(batch)]
    while any(not r.output_ids for r in reqs):
        core.step()

    def stub_forward(b, drafts=None, all_hidden=False, future_tokens=None):  # the host part of forward() only
        rows = build_rows(b, drafts or {}, core.pool.page_size, 16)
        n = len(rows.logit_rows)
        return ForwardOut(torch.zeros(n, vocab), torch.zeros(n, hidden), None)

    core.runner.forward = stub_forward
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    eng.shutdown()
    return dict(batch=batch, overlap=overlap, step_ms_median=statistics.median(times) * 1e3,
                step_ms_p90=np.percentile(times, 90) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--pages", type=int, default=72, help="pages per sequence (1,150 tokens in pages of 16)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--model", default=None, help="HF folder for parts 2-3 (default: a tiny random Llama)")
    ap.add_argument("--out", default="bench_host_step.json")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    model_dir = a.model
    if model_dir is None:
        from tests.conftest import _save_tiny

        model_dir = _save_tiny(Path(tempfile.mkdtemp(prefix="runtime-tiny-")))
    fills = [page_table_fill(b, a.steps, a.pages) for b in batches]
    collection = gc_full_collection(model_dir)
    steps = [engine_host_step(model_dir, b, min(a.steps, 300), overlap) for b in batches for overlap in (False, True)]
    print(f"\npage table fill, ms per step ({a.pages} pages per sequence)")
    print(f"{'batch':>6} {'whole':>8} {'incremental':>12}")
    for f in fills:
        print(f"{f['batch']:>6} {f['whole_ms']:8.3f} {f['incremental_ms']:12.3f}")
    print(f"\nfull GC collection of an engine process ({collection['tracked_objects']} tracked objects): "
          f"{collection['full_collect_ms']:.1f} ms; after freeze_startup_heap {collection['after_freeze_ms']:.2f} ms")
    print("\nengine step on the host, forward stubbed (with --overlap-schedule: its bookkeeping, which a GPU overlaps)")
    for s in steps:
        mode = "overlap" if s["overlap"] else "plain  "
        print(f"  batch {s['batch']:>4} {mode}: median {s['step_ms_median']:.3f} ms, p90 {s['step_ms_p90']:.3f} ms")
    with open(a.out, "w") as f:
        json.dump(dict(page_table=fills, gc=collection, host_step=steps), f, indent=2)


if __name__ == "__main__":
    main()
