"""The adaptive speculation policy drafts where measured speculative steps yield more
tokens per second than plain ones, per batch-size bucket, and notices when that changes."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from runtime import Engine, SamplingParams
from runtime.engine.speculative.policy import MAX_PROBE_EVERY, PROBE_EVERY, PROBE_STEPS, SpeculationPolicy
from tests.unit.test_speculative import COPY


def drive(policy: SpeculationPolicy, batch: int, steps: int, cost: Callable[[int], tuple[float, float]]) -> list[int]:
    """Run `steps` decisions at this batch size; cost(k) -> (step seconds, tokens per request)."""
    chosen = []
    for _ in range(steps):
        k = policy.num_draft_tokens(batch)
        chosen.append(k)
        policy.record_step(batch, k, *cost(k))
    return chosen


class Intermittent:
    """A stand-in policy that drafts one step in `every`: what the adaptive policy does to a
    drafter it judges not worth it (pending pairs pile up between drafting steps)."""

    mode = "fixed"

    def __init__(self, k: int, every: int) -> None:
        self.k, self.every, self.n = k, every, 0

    def num_draft_tokens(self, batch_size: int, finish: object = None) -> int:
        self.n += 1
        return self.k if self.n % self.every == 0 else 0

    def record_step(self, *args: object) -> None:
        pass


def spec_wins(k: int) -> tuple[float, float]:
    return (1.5e-3, 2.5) if k else (1.0e-3, 1.0)  # 1667 vs 1000 tokens/s


def spec_loses(k: int) -> tuple[float, float]:
    return (2.5e-3, 1.3) if k else (1.0e-3, 1.0)  # 520 vs 1000 tokens/s


def test_fixed_always_drafts_k() -> None:
    policy = SpeculationPolicy(4, "fixed", max_batch=2)
    assert drive(policy, 64, 40, spec_loses) == [4] * 40


def test_keeps_drafting_where_it_pays() -> None:
    chosen = drive(SpeculationPolicy(4), 1, 160, spec_wins)
    assert chosen[:3] == [4, 4, 0]  # each option measured (the first drafting step is not)
    assert chosen.count(0) <= 1 + PROBE_STEPS * (160 // PROBE_EVERY)  # then plain only to re-check


def test_the_drafters_catch_up_step_is_not_held_against_it() -> None:
    """EAGLE's first drafting step after plain ones also caches the skipped tokens."""
    policy = SpeculationPolicy(4)
    last = [0]

    def cost(k: int) -> tuple[float, float]:
        catch_up = k and not last[0]
        last[0] = k
        return (20e-3, 2.5) if catch_up else spec_wins(k)

    chosen = drive(policy, 1, 160, cost)
    assert chosen[-PROBE_EVERY:].count(4) >= PROBE_EVERY - PROBE_STEPS


def test_stops_drafting_where_it_loses() -> None:
    policy = SpeculationPolicy(4)
    chosen = drive(policy, 1, 160, spec_loses)
    assert chosen.count(4) <= 2 + PROBE_STEPS * (160 // PROBE_EVERY)
    assert 4 in chosen[PROBE_EVERY:]  # still probed now and then
    assert policy.speedup(1) == pytest.approx(520 / 1000, rel=1e-6)


def test_buckets_decide_separately() -> None:
    policy = SpeculationPolicy(4, max_batch=64)
    drive(policy, 1, 40, spec_wins)
    drive(policy, 16, 40, spec_loses)
    assert drive(policy, 1, PROBE_EVERY, spec_wins).count(4) >= PROBE_EVERY - PROBE_STEPS
    assert drive(policy, 13, PROBE_EVERY, spec_loses).count(0) >= PROBE_EVERY - PROBE_STEPS  # 13 shares 16's bucket


def test_notices_a_change_in_the_text() -> None:
    policy = SpeculationPolicy(4)
    drive(policy, 1, 100, spec_loses)  # open chat: drafting off
    chosen = drive(policy, 1, MAX_PROBE_EVERY + PROBE_EVERY, spec_wins)  # then copy-heavy text: it pays
    switched = next(i for i in range(len(chosen)) if chosen[i:i + PROBE_EVERY].count(4) >= PROBE_EVERY - PROBE_STEPS)
    assert switched < MAX_PROBE_EVERY  # at the next probe, not after many


def test_probes_are_paced_by_what_they_cost() -> None:
    """A probe of a drafter that loses badly costs a lot, so the first comes late; near
    break-even the first comes soon; probes that confirm the choice back off to at most
    PROBE_STEPS per MAX_PROBE_EVERY."""
    policy = SpeculationPolicy(4)
    bad = drive(policy, 1, 4 * MAX_PROBE_EVERY, spec_loses)
    first = next(i for i in range(3, len(bad)) if bad[i])
    assert first >= 3 + 100  # a probe loses 3 x (1 - 0.52) steps' worth: with PROBE_BUDGET 1%, ~144 steps
    late = drive(policy, 1, 4 * MAX_PROBE_EVERY, spec_loses)
    assert late.count(4) <= PROBE_STEPS * 4 + PROBE_STEPS

    def near_even(k: int) -> tuple[float, float]:
        return (1.05e-3, 1.02) if k else (1.0e-3, 1.0)  # 971 vs 1000 tokens/s

    near = drive(SpeculationPolicy(4), 1, 3 * PROBE_EVERY, near_even)
    assert near[3:].count(4) >= PROBE_STEPS  # re-checked within the first PROBE_EVERY steps or so


def test_never_drafts_above_max_batch() -> None:
    assert set(drive(SpeculationPolicy(4, max_batch=8), 9, 40, spec_wins)) == {0}


def test_adaptive_engine_measures_both_and_stays_exact(tiny_model_dir: str) -> None:
    """In the engine the policy sees real step times; whatever it decides, greedy output is
    the plain engine's."""
    params = SamplingParams(max_tokens=3 * PROBE_EVERY, temperature=0.0, ignore_eos=True)
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    ref = base.generate([COPY], params)[0].token_ids
    spec = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="ngram",
                  num_draft_tokens=4, speculative_policy="adaptive")
    got = spec.generate([COPY], params)[0]
    assert got.token_ids == ref
    assert spec.core.policy.speedup(1) is not None  # both options were timed at batch 1
    spec.shutdown()
    spec.core.pool.check_no_leak(0)


def test_finish_gain_is_set_by_the_request_that_finishes_last() -> None:
    from runtime.engine.speculative.policy import PRIOR_STEPS, finish_gain

    # Well measured (1,000 drafting steps): a request that accepts 3.0 tokens per step with
    # 100 tokens left does not matter beside one that accepts 1.2 with 200 left.
    got = finish_gain([(100, 1000, 3000), (200, 1000, 1200)], prior=2.0)
    assert got == pytest.approx(200 / (200 * 1008 / (1200 + 8 * 2.0)), rel=1e-9)
    assert 1.19 < got < 1.21
    # An unmeasured request counts at the prior; nothing left: no figure.
    assert finish_gain([(50, 0, 0)], prior=2.5) == pytest.approx(2.5)
    assert finish_gain([(0, 3, 9)], prior=2.0) is None
    # A few unlucky steps are shrunk toward the prior, and an accept length is never below 1.
    assert finish_gain([(80, 2, 2)], prior=3.0) == pytest.approx((2 + PRIOR_STEPS * 3.0) / (2 + PRIOR_STEPS))
    assert finish_gain([(80, 100, 50)], prior=1.0) == pytest.approx(1.0)


def test_with_nothing_waiting_the_slowest_request_decides() -> None:
    """Mean gain 1.75 tokens for 1.4x the plain step: drafting pays for the batch's tokens/s
    while requests wait, and is turned off when none wait and the request that finishes last
    accepts 1.1."""
    plain_s, spec_s = 0.001, 0.0014

    def run(finish: list | None) -> tuple[int, int]:
        policy = SpeculationPolicy(4, "adaptive", max_batch=64)
        k = 0
        for _ in range(40):
            k = policy.num_draft_tokens(16, finish)
            policy.record_step(16, k, spec_s if k else plain_s, 1.75 if k else 1.0)
        return k, policy.finish_decided(16)

    assert run(None) == (4, 0)
    k, decided = run([(200, 500, 550)] + [(150, 500, 1500)] * 15)
    assert k == 0 and decided > 0  # the trace's figure: finish_gain turned these decisions


def test_finish_figures_are_listed_only_when_weighed() -> None:
    """A function for `finish` is called only where the decision uses it: not for a batch
    over max_batch, nor while the options are first measured; then on every judged step."""
    calls = []

    def finish() -> list:
        calls.append(1)
        return [(100, 10, 20)] * 4

    policy = SpeculationPolicy(4, "adaptive", max_batch=8)
    assert policy.num_draft_tokens(16, finish) == 0 and not calls
    for _ in range(8):
        k = policy.num_draft_tokens(4, finish)
        policy.record_step(4, k, 0.0014 if k else 0.001, 2.0 if k else 1.0)
    judged = len(calls)
    assert 0 < judged < 8
    policy.num_draft_tokens(4, finish)
    assert len(calls) == judged + 1
