"""An engine step that runs out of memory fails the requests whose work made it big (the
prefill chunks), frees their KV pages and keeps serving: decode requests of the same step
run again and end with exactly the tokens of a run that never failed, later requests
succeed, and errors that are not allocation failures still raise. A worker that does die
is restarted within the bound the controller logs."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.config import ClusterConfig
from runtime.controller import controller as ctl
from runtime.engine.alloc_failure import is_alloc_failure
from runtime.engine.core import EngineCore
from runtime.engine.kv_pool import OutOfPages
from runtime.engine.llm import GenerationError
from runtime.messages import Ready

FAIL = "RUNTIME_TEST_FAIL_ALLOC"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Iterator[Engine]:
    e = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, max_batch_tokens=64)
    yield e
    e.shutdown()


_seed = iter(range(1000, 10**6))


def prompt(n: int) -> list[int]:
    """n random token ids, different on every call (so no prefix-cache hit shrinks a step)."""
    rng = random.Random(next(_seed))
    return [rng.randrange(3, 512) for _ in range(n)]


def run_alone(core: EngineCore, rid: str, ids: list[int], params: SamplingParams) -> list[int]:
    req = core.add_request(rid, ids, params)
    while not req.finished:
        core.step()
    return list(req.output_ids)


def assert_no_page_leaked(core: EngineCore) -> None:
    assert not core.scheduler.running and not core.scheduler.waiting and not core.scheduler.held
    core.scheduler.check_no_leak()
    core.cache.reset()
    core.pool.check_no_leak(0)


def test_failed_step_fails_its_prefill_frees_pages_next_request_succeeds(engine: Engine, monkeypatch) -> None:
    core = engine.core
    failures = core.num_alloc_failures
    short = prompt(6)
    expected = engine.generate([short], GREEDY)[0].token_ids
    monkeypatch.setenv(FAIL, "tokens:30")
    r = engine.generate([prompt(40)], GREEDY)[0]
    assert r.finish_reason == "error" and r.token_ids == []
    assert "ran out of host memory" in r.error and "tried to allocate 8.12 GiB" in r.error
    assert "offline-" in r.error and "retry" in r.error and "shorter prompt" in r.error
    assert core.num_alloc_failures == failures + 1
    assert not core.requests
    # The engine serves the next request, with the tokens it gave before the failure.
    assert engine.generate([short], GREEDY)[0].token_ids == expected
    assert_no_page_leaked(core)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)],
                         ids=["greedy", "seeded-sampling"])
def test_decode_request_in_the_failed_step_runs_again_unchanged(engine: Engine, monkeypatch,
                                                                  params: SamplingParams) -> None:
    """A large prefill joins the batch of a decoding request and the step fails: the prefill
    fails, the decode row is rerun and the request ends with the unfailed run's tokens."""
    core = engine.core
    ids = prompt(5)
    expected = run_alone(core, "ref", ids, params)
    monkeypatch.setenv(FAIL, "tokens:30")
    dec = core.add_request("dec", ids, params)
    for _ in range(3):  # prefill, then decoding
        assert not any(o.error for o in core.step())
    assert len(dec.output_ids) == 3
    big = core.add_request("big", prompt(40), params)
    failures = core.num_alloc_failures
    outs = core.step()
    assert core.num_alloc_failures == failures + 1
    assert [(o.req.rid, o.req.finish_reason) for o in outs if o.error] == [("big", "error")]
    assert big.finished and not big.pages and len(dec.output_ids) == 3 and not dec.finished
    while not dec.finished:
        assert not any(o.error for o in core.step())
    assert dec.output_ids == expected and dec.finish_reason == "length"
    assert_no_page_leaked(core)


def test_decode_only_step_fails_its_newest_half(engine: Engine, monkeypatch) -> None:
    core = engine.core
    prompts = [prompt(5) for _ in range(4)]
    expected = [run_alone(core, f"ref{i}", p, GREEDY) for i, p in enumerate(prompts)]
    reqs = [core.add_request(f"d{i}", p, GREEDY) for i, p in enumerate(prompts)]
    core.step()  # the four prefills, in one step
    assert all(len(r.output_ids) == 1 for r in reqs)
    monkeypatch.setenv(FAIL, f"steps:{core.num_forwards + 1}")
    outs = core.step()
    assert sorted(o.req.rid for o in outs if o.error) == ["d2", "d3"]  # admitted last
    while core.has_work:
        assert not any(o.error for o in core.step())
    assert [r.output_ids for r in reqs[:2]] == expected[:2]
    assert [r.finish_reason for r in reqs] == ["length", "length", "error", "error"]
    assert_no_page_leaked(core)


@pytest.mark.parametrize("spec", ["chains", "eagle"])
def test_failed_verify_step_reruns_with_exact_tokens(tiny_model_dir: str, engine: Engine, tmp_path, monkeypatch,
                                                     caplog, spec: str) -> None:
    """A speculative verify step of four requests, each verifying 4 drafts, fails: the
    newest two fail, the other two run again (an EAGLE drafter's state starts over) and
    still end with the target's own greedy tokens."""
    prompts = [prompt(6) for _ in range(4)]
    expected = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    drafts = None
    if spec == "eagle":  # a random head: its drafts are poor, but it drafts every step
        from runtime.engine.speculative.eagle_head import save_head
        from runtime.engine.weights import load_model
        from tests.unit.test_eagle import random_head

        save_head(str(tmp_path / "h"), random_head(load_model(tiny_model_dir, device="cpu", dtype="float32")),
                  {"target_model": "tiny"})
        spec_engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="eagle",
                             draft_model=str(tmp_path / "h"), speculative_policy="fixed")
        core = spec_engine.core
    else:  # chains given to step(), as a drafter hands them over
        core = engine.core
        drafts = {f"s{i}": [3, 4, 5, 6] for i in range(4)}
    reqs = [core.add_request(f"s{i}", p, GREEDY) for i, p in enumerate(prompts)]
    core.step()  # the prefills
    core.step(drafts)  # a verify step
    monkeypatch.setenv(FAIL, f"steps:{core.num_forwards + 1}")
    outs = core.step(drafts)
    assert sorted(o.req.rid for o in outs if o.error) == ["s2", "s3"]
    assert "a step of 4 requests (20 new tokens)" in caplog.text  # each verified 4 drafts
    while core.has_work:
        assert not any(o.error for o in core.step())
    assert [r.output_ids for r in reqs[:2]] == expected[:2]
    assert_no_page_leaked(core)
    if spec == "eagle":
        assert not core.drafter.states
        core.drafter.pool.check_no_leak(0)


def test_chunked_prefill_failing_midway_frees_its_pages(tiny_model_dir: str, monkeypatch) -> None:
    """A prompt prefilled over several steps fails in its third chunk: the pages of the
    chunks already computed go back (the full ones stay reusable in the prefix cache)."""
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, max_batch_tokens=16)
    core = engine.core
    req = core.add_request("long", prompt(60), GREEDY)
    monkeypatch.setenv(FAIL, "steps:3")
    core.step()
    core.step()
    assert req.num_computed == 32 and len(req.pages) == 8
    outs = core.step()
    assert [o.req.rid for o in outs if o.error] == ["long"] and req.finish_reason == "error"
    assert core.cache.cached_pages == 8  # the two computed chunks, now only in the cache
    assert_no_page_leaked(core)


def test_prefill_worker_request_is_not_held_after_failure(engine: Engine, monkeypatch) -> None:
    """Prefill workers keep a finished request's pages for its transfer (hold_kv); a
    failed one has nothing to send and must not keep them."""
    core = engine.core
    req = core.add_request("held", prompt(40), SamplingParams(max_tokens=1, temperature=0.0))
    req.hold_kv = True
    monkeypatch.setenv(FAIL, "tokens:30")
    outs = core.step()
    assert [o.error is not None for o in outs] == [True]
    assert not core.scheduler.held and not req.pages
    assert_no_page_leaked(core)


def test_real_cpu_allocator_failure_in_the_forward(engine: Engine, monkeypatch) -> None:
    """Not the injected error: torch's own CPU allocator failing inside the forward."""
    core = engine.core
    forward = core.runner.forward

    def greedy_forward(batch, *args, **kwargs):
        if batch.num_tokens > 30:
            torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: "DefaultCPUAllocator: can't allocate memory"
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(core.runner, "forward", greedy_forward)
    r = engine.generate([prompt(40), prompt(4)], GREEDY)
    assert [x.finish_reason for x in r] == ["error", "length"]
    assert "tried to allocate 1125899906842624 bytes" in r[0].error
    assert_no_page_leaked(core)


def test_other_errors_still_raise(engine: Engine, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(engine.core.runner, "forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        engine.generate([prompt(4)], GREEDY)
    monkeypatch.undo()
    assert_no_page_leaked(engine.core)


def test_stream_raises_generation_error(engine: Engine, monkeypatch) -> None:
    monkeypatch.setenv(FAIL, "tokens:30")
    with pytest.raises(GenerationError, match="ran out of host memory"):
        list(engine.stream(prompt(40), GREEDY))
    assert_no_page_leaked(engine.core)


def test_drafting_out_of_memory_runs_the_step_without_drafts(tiny_model_dir: str, monkeypatch) -> None:
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="ngram",
                    speculative_policy="fixed")
    ids = [7, 8, 9, 10] * 6
    expected = engine.generate([ids], GREEDY)[0].token_ids
    propose = engine.core.drafter.propose
    calls = []

    def flaky(reqs, k):
        calls.append(len(reqs))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return propose(reqs, k)

    monkeypatch.setattr(engine.core.drafter, "propose", flaky)
    r = engine.generate([ids], GREEDY)[0]
    assert len(calls) > 2 and r.finish_reason == "length" and r.token_ids == expected
    assert_no_page_leaked(engine.core)


def test_alloc_failure_classification() -> None:
    try:
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as e:
        cpu = e
    assert is_alloc_failure(cpu) and "can't allocate memory" in str(cpu)
    assert is_alloc_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.12 GiB."))
    assert is_alloc_failure(OutOfPages("asked for 3 KV pages, 0 free"))
    assert is_alloc_failure(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"))
    assert not is_alloc_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_alloc_failure(ValueError("out of memory"))


def test_bad_injection_spec_is_a_clear_error(engine: Engine, monkeypatch) -> None:
    monkeypatch.setenv(FAIL, "sometimes")
    with pytest.raises(ValueError, match="RUNTIME_TEST_FAIL_ALLOC must be"):
        engine.generate([prompt(4)], GREEDY)
    monkeypatch.delenv(FAIL)
    assert_no_page_leaked(engine.core)


class _Proc:
    """A stand-in worker process: exits when killed (or told to)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.code = pid, None

    def exitcode(self) -> int | None:
        return self.code

    def kill(self) -> None:
        if self.code is None:
            self.code = -9


def test_controller_restarts_within_its_stated_bound(tmp_path, caplog) -> None:
    """A restarted worker not ready within the logged bound is killed and started again;
    restarts stop after MAX_RESTARTS within the window and resume once it has passed."""
    pids = iter(range(100, 200))
    c = ctl.Controller(ClusterConfig(num_prefill=0, num_decode=1, ipc_dir=str(tmp_path)),
                       lambda role, wid: _Proc(next(pids)))
    caplog.set_level(logging.INFO, "runtime.controller")
    try:
        c.start_workers()
        w = c.workers[("decode", 0)]
        w.spawned_at -= 4.0  # its first start took 4 s

        async def ready() -> None:
            await c.on_ready(Ready("decode", 0, w.proc.pid, 10, "cpu"))

        asyncio.run(ready())
        assert 3.9 < w.first_start_s < 5.0
        w.proc.code = 1  # it dies
        asyncio.run(c.check_health())
        assert w.restarts == 1 and w.proc.pid == 101 and not w.alive
        assert "decode worker 0 restarted (pid 101, restart 1); expect it ready within 60 s" in caplog.text
        assert "expected ready within" in c._no_worker("decode")
        w.ready_by = time.monotonic() - 1  # the bound passed: killed and started again
        asyncio.run(c.check_health())
        assert w.restarts == 2 and w.proc.pid == 102 and "is not ready" in caplog.text
        asyncio.run(ready())
        assert w.alive and w.ready_by is None and "decode worker 0 ready again after" in caplog.text
        for _ in range(3):  # the 3rd..5th restarts within the window
            w.proc.code = 1
            asyncio.run(c.check_health())
            asyncio.run(ready())
        assert w.restarts == 5
        w.proc.code = 1
        asyncio.run(c.check_health())
        assert w.restarts == 5 and not w.alive and "not restarting it for" in caplog.text
        assert "expected ready" not in c._no_worker("decode")
        w.restart_times = type(w.restart_times)(t - ctl.RESTART_WINDOW_S for t in w.restart_times)
        asyncio.run(c.check_health())
        assert w.restarts == 6
    finally:
        c.close()
