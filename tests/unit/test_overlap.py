"""The overlap schedule (runtime/engine/overlap.py): steps launched before the previous
step's tokens are read give exactly the plain schedule's outputs, through stops, sampling,
logprobs, retraction, chunked prefill, prefix-cache hits, aborts, fallbacks and allocation
failures, and leak no page. On CPU nothing runs asynchronously, but every piece of the
bookkeeping (placeholders, device-side token feeding, late stops) runs as on a GPU."""
from __future__ import annotations

import pytest

from runtime import Engine, SamplingParams
from runtime.engine import overlap as overlap_mod
from tests.unit.test_engine import PROMPTS, SHARED


def _engine(model: str, overlap: bool, **kw) -> Engine:
    return Engine(model, device="cpu", dtype="float32", overlap_schedule=overlap, **kw)


def _counting(monkeypatch) -> dict:
    """Counts overlapped steps (the path must really be taken)."""
    seen = {"steps": 0}
    real = overlap_mod.OverlapSteps._step_overlapped

    def counted(self):
        seen["steps"] += 1
        return real(self)

    monkeypatch.setattr(overlap_mod.OverlapSteps, "_step_overlapped", counted)
    return seen


def _prompts(engine: Engine) -> list[list[int]]:
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return ids + [tok(SHARED + q)["input_ids"] for q in ("What is the answer?", "Why is that so?")]


def _run(model: str, overlap: bool, params, prompts=None, **kw):
    engine = _engine(model, overlap, **kw)
    prompts = prompts or _prompts(engine)
    results = engine.generate(prompts, params)
    engine.core.scheduler.check_no_leak()
    retractions = engine.core.scheduler.num_retractions
    engine.shutdown()
    engine.core.pool.check_no_leak(0)
    return results, retractions


def _same(a, b) -> None:
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert [r.stop_reason for r in a] == [r.stop_reason for r in b]


@pytest.mark.parametrize("opts", [
    dict(page_size=4),
    dict(page_size=4, max_batch_tokens=16),  # chunked prefill beside decode rows
    dict(page_size=4, kv_cache_tokens=128),  # retraction and recompute
    dict(page_size=1, prefix_cache=False),
], ids=["plain", "chunked", "retract", "page1-nocache"])
def test_greedy_outputs_equal_the_plain_schedule(tiny_model_dir: str, monkeypatch, opts: dict) -> None:
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2)
    plain, _ = _run(tiny_model_dir, False, params, **opts)
    seen = _counting(monkeypatch)
    got, retractions = _run(tiny_model_dir, True, params, **opts)
    assert seen["steps"] > 10
    _same(plain, got)
    for a, b in zip(plain, got):
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-5)
        # (batches differ in which rows share a step, which moves fp32 sums in the last bits)
        assert [[t for t, _ in lp.top] for lp in a.logprobs] == [[t for t, _ in lp.top] for lp in b.logprobs]
        assert [v for lp in a.logprobs for _, v in lp.top] == pytest.approx([v for lp in b.logprobs for _, v in lp.top],
                                                                            abs=1e-5)
    if "kv_cache_tokens" in opts:
        assert retractions > 0


def test_stops_found_a_step_late_end_requests_where_the_plain_schedule_does(tiny_model_dir: str) -> None:
    """Stop tokens, EOS, max_tokens of 1 and min_tokens: each request stops at the same token
    although the overlapped engine has already launched its next row."""
    engine = _engine(tiny_model_dir, False, page_size=4)
    prompts = _prompts(engine)
    free = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    engine.shutdown()
    # Stop each prompt at a token it generates mid-way; some at the first token, one never.
    params = [SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[r.token_ids[i % 7]])
              for i, r in enumerate(free)]
    params[0] = SamplingParams(max_tokens=1, temperature=0.0)
    params[1] = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=5, stop_token_ids=[free[1].token_ids[2]])
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    got, _ = _run(tiny_model_dir, True, params, prompts, page_size=4)
    _same(plain, got)
    assert {r.finish_reason for r in got} == {"stop", "length"}


def test_seeded_sampling_is_the_same_token_for_token(tiny_model_dir: str) -> None:
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=i, logprobs=1) for i in range(10)]
    plain, _ = _run(tiny_model_dir, False, params, page_size=4)
    got, _ = _run(tiny_model_dir, True, params, page_size=4)
    _same(plain, got)


def test_penalties_count_the_token_still_in_flight(tiny_model_dir: str, monkeypatch) -> None:
    """Repetition, presence and frequency penalties see every output token, the one the
    step in flight samples included (added on the device): the same tokens as the plain
    schedule, greedy and sampled."""
    prompts = [[20 + i] * (5 + 3 * i) for i in range(6)]  # the tiny model repeats its last token on these
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, presence_penalty=1.5),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=1.0),
              SamplingParams(max_tokens=16, temperature=0.9, seed=3, repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)]
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    free, _ = _run(tiny_model_dir, False, [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * 3,
                   prompts[:3], page_size=4)
    assert [r.token_ids for r in plain[:3]] != [r.token_ids for r in free]  # the penalties do change tokens
    seen = _counting(monkeypatch)
    got, _ = _run(tiny_model_dir, True, params, prompts, page_size=4)
    assert seen["steps"] > 10
    _same(plain, got)


def test_requests_that_need_the_host_fall_back_to_plain_steps(tiny_model_dir: str, monkeypatch) -> None:
    """A request with prompt logprobs (its prefill reads hidden states on the host) makes
    the engine settle the step in flight and run plain steps while it runs; the outputs are
    the plain schedule's either way."""
    prompts = [[30 + i] * (4 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=10 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    params[3] = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs_start=1)
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    seen = _counting(monkeypatch)
    got, _ = _run(tiny_model_dir, True, params, prompts, page_size=4)
    assert seen["steps"] > 0  # after the penalised request ended
    _same(plain, got)


def test_abort_while_a_step_is_in_flight(tiny_model_dir: str) -> None:
    engine = _engine(tiny_model_dir, True, page_size=4)
    core = engine.core
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reqs = [core.add_request(f"r{i}", [40 + i] * (6 + i), params) for i in range(4)]
    for _ in range(5):
        core.step()
    assert core._inflight is not None
    core.abort("r1")
    outs = []
    while core.has_work:
        outs += core.step()
    assert not any(o.req.rid == "r1" and o.new_token_ids for o in outs)  # its voided row gave nothing
    assert [len(r.output_ids) for i, r in enumerate(reqs) if i != 1] == [20, 20, 20]
    assert all(t >= 0 for r in reqs for t in r.output_ids[:-1])
    core.scheduler.check_no_leak()
    engine.shutdown()
    core.pool.check_no_leak(0)


def test_allocation_failure_at_launch_settles_the_step_in_flight_first(tiny_model_dir: str, monkeypatch) -> None:
    """A launch that runs out of memory: the step in flight still delivers its tokens, the
    failed step's newest requests fail with an error, the rest end with the tokens they
    would have had, and no page leaks."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[50 + i] * 5 for i in range(4)]
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    engine = _engine(tiny_model_dir, True, page_size=4)
    core = engine.core
    reqs = [core.add_request(f"d{i}", p, params) for i, p in enumerate(prompts)]
    for _ in range(4):
        core.step()
    monkeypatch.setenv("RUNTIME_TEST_FAIL_ALLOC", f"steps:{core.num_forwards + 1}")
    outs = core.step()
    assert sorted(o.req.rid for o in outs if o.error) == ["d2", "d3"]
    assert any(o.new_token_ids for o in outs)  # the settled step's tokens came with it
    while core.has_work:
        assert not any(o.error for o in core.step())
    assert [r.output_ids for r in reqs[:2]] == [r.token_ids for r in plain[:2]]
    core.scheduler.check_no_leak()
    engine.shutdown()
    core.pool.check_no_leak(0)


def test_a_sequence_outgrowing_the_pool_ends_as_in_the_plain_schedule(tiny_model_dir: str) -> None:
    """The scheduler ends a lone request that no longer fits the pool while its last token is
    still in flight: that token is kept, in its final output."""
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    plain, _ = _run(tiny_model_dir, False, params, [[5, 6, 7]], page_size=4, kv_cache_tokens=16)
    got, _ = _run(tiny_model_dir, True, params, [[5, 6, 7]], page_size=4, kv_cache_tokens=16)
    assert plain[0].finish_reason == "length" and 0 < len(plain[0].token_ids) < 100
    _same(plain, got)


def test_stop_strings_abort_a_request_with_a_step_in_flight(tiny_model_dir: str) -> None:
    """The offline Engine aborts a request whose text hit a stop string; with the overlap
    schedule its next token is in flight then: the result holds no placeholder and equals
    the plain schedule's."""
    engine = _engine(tiny_model_dir, False, page_size=4)
    prompts = _prompts(engine)
    free = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    stops = [engine.tokenizer.decode(r.token_ids[3:5]) for r in free]
    engine.shutdown()
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[s]) for s in stops if s.strip()]
    prompts = [p for p, s in zip(prompts, stops) if s.strip()]
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    got, _ = _run(tiny_model_dir, True, params, prompts, page_size=4)
    assert all(t >= 0 for r in got for t in r.token_ids)
    assert [r.text for r in plain] == [r.text for r in got]
    assert any(r.finish_reason == "stop" for r in got)


def test_ngram_speculation_overlaps_where_the_policy_never_drafts(tiny_model_dir: str, monkeypatch) -> None:
    """An n-gram drafter under the adaptive policy drafts nothing above its max batch: those
    steps take the overlap path, and once few requests are left it drafts again; the tokens
    are those of no speculation."""
    prompts = [[60 + i, 61 + i] * (3 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    plain, _ = _run(tiny_model_dir, False, params, prompts, page_size=4)
    seen = _counting(monkeypatch)
    got, _ = _run(tiny_model_dir, True, params, prompts, page_size=4, speculative="ngram", speculative_max_batch=3)
    assert seen["steps"] > 5
    _same(plain, got)
