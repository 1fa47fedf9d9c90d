"""When to speculate: measured, not guessed.

A speculative step costs more than a plain one (the drafter's work, a verify forward over
k+1 rows per request, acceptance) and gains `accept length` tokens per request instead of
one. Whether that pays depends on the model, the device, the batch size and the text
(copy-heavy text accepts long runs, open chat few), so `adaptive` measures it: per batch-
size bucket it keeps a running estimate of the wall time of pure-decode steps with and
without drafting and of the tokens each gains per request, and drafts only where that
yields more tokens per second (by a margin, when that means changing its mind).

Now and then a bucket runs the other option for PROBE_STEPS steps, so a shift in the text
or the load is noticed. Probes are paced by what they cost: the first comes after enough
steps that a confirming probe costs at most PROBE_BUDGET of the bucket's output (a drafter
that loses badly is re-checked rarely, one near break-even soon), each confirming probe
doubles the wait up to MAX_PROBE_EVERY, and a probe that moves the other option's
estimate up re-checks after PROBE_EVERY steps. The first drafting step after plain ones is
not measured as drafting: stateful drafters (EAGLE, a draft model) catch up there on the
tokens they skipped; its extra time counts as a cost of probing instead.

A bucket that has not measured both options yet follows the nearest bucket that has, and
measures the missing option at its first probe, which comes sooner the farther that
neighbour is (a batch that shrinks as its requests finish passes through every bucket
below it, and measuring each from scratch cost more than it learned); with nothing judged
anywhere it drafts first, then runs plain.

While requests wait to join the batch, a finished request's place is taken at once and the
batch's tokens/s is what counts: the mean tokens a drafting step gains per request. With
none waiting, the batch is done when its last request is, and drafting must bring that
moment closer: the engine passes each request's tokens left and its drafting record, and
the policy weighs drafting by the smaller of the mean gain and `finish_gain`, the factor by
which drafting shortens the steps the batch still needs (each request's tokens left over
its own accept length, against its tokens left). On the H200 (SmolLM2, n-gram, chat, batch
16) the mean was 1.86 tokens per drafting step for 1.43x the plain step's time, yet the
batch finished 11% later: its requests accept 1.0-3.5 tokens per step, the fast ones
finished first, and the slow ones then ran nearly alone in steps that cost almost as much.

Above `max_batch` decoding requests it never drafts (the verify rows would not fit the
captured graphs). `fixed` always drafts k. Under both, the engine trims drafts so that a
verify step fits the decode graphs (EngineCore._propose). tests/unit/test_spec_policy_sim.py
holds the policy to its contract on a simulated cost model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PROBE_EVERY = 16  # the shortest wait between two tries of the option not in use
MAX_PROBE_EVERY = 256  # ... and the longest, after probes that kept confirming the choice
PROBE_STEPS = 3  # a try's length
# The estimates average the last HORIZON steps of the option in use (a plain mean until
# there are that many) and the last PROBE_HORIZON of the option not in use, whose steps
# come a few per probe. One step says little: at batch 1 a drafting step gains 1 token or
# k+1, and wall times jitter by 10% or more; averaging ~5 steps (a weight of 0.2, before)
# flipped the choice on noise.
HORIZON = 32
PROBE_HORIZON = 8
# The option not in use must beat the choice by this fraction to replace it: near break-
# even, flipping on noise costs probes and catch-ups and gains nothing.
MARGIN = 0.02
PROBE_BUDGET = 0.01  # the share of a bucket's output confirming probes may cost at first
SHIFT = 1.1  # a probe that raises the other option's rate over the choice's by this factor
# Per decoding request: (tokens it may still generate, drafting steps, tokens those gained).
Finish = list[tuple[int, int, int]] | Callable[[], list[tuple[int, int, int]]]
PRIOR_STEPS = 8  # finish_gain: a request's accept length counts the bucket's mean as this many steps


def finish_gain(requests: list[tuple[int, int, int]], prior: float) -> float | None:
    """How many times fewer steps the batch needs to finish when drafting. requests: per
    decoding request (tokens it may still generate, drafting steps it took part in, tokens
    those gained). Each request's accept length is its own mean shrunk toward `prior` (the
    bucket's mean gain) by PRIOR_STEPS steps' weight, so a few lucky or unlucky steps do not
    decide. The result: the most tokens any request has left, over the most steps any
    request would need with drafting. None when nothing is left."""
    longest = max((r for r, _, _ in requests), default=0)
    if longest <= 0:
        return None
    steps = max(r * (s + PRIOR_STEPS) / max(t + PRIOR_STEPS * prior, s + PRIOR_STEPS) for r, s, t in requests)
    return longest / max(steps, 1e-9)


@dataclass
class _Estimate:
    seconds: float  # running estimate of one step's wall time
    tokens: float  # running estimate of the tokens one step gains per request
    samples: int = 1

    @property
    def rate(self) -> float:
        """Tokens per request per second."""
        return self.tokens / max(self.seconds, 1e-9)

    def update(self, seconds: float, tokens: float, horizon: int) -> None:
        self.samples += 1
        weight = 1.0 / min(self.samples, horizon)
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens - self.tokens)


@dataclass
class _Bucket:
    steps: int = 0  # decisions taken
    choice: int = -1  # the option last judged best, or borrowed from a neighbour (-1: none yet)
    judged: bool = False  # whether `choice` was judged from this bucket's own estimates
    interval: int = PROBE_EVERY  # the wait before the next probe
    probe_at: int = 0  # the step at which the next probe starts
    probe_left: int = 0  # steps left in the probe under way
    probe_ratio: float = 0.0  # at its start: the other option's rate over the choice's
    last_recorded: int = 0  # k of the last measured step (0: plain)
    catch_up: float = 0.0  # the drafter's catch-up step: its extra seconds over a drafting step
    finish_decided: int = 0  # decisions finish_gain turned (a figure for traces)


class SpeculationPolicy:
    def __init__(self, k: int, mode: str = "adaptive", max_batch: int = 32) -> None:
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"speculative policy must be fixed or adaptive (got {mode!r})")
        self.k = k
        self.mode = mode
        self.max_batch = max_batch
        self._estimates: dict[tuple[int, int], _Estimate] = {}  # (bucket, k) -> estimate
        self._buckets: dict[int, _Bucket] = {}

    @staticmethod
    def bucket(batch_size: int) -> int:
        """Batch sizes measured together: 1, 2, 3-4, 5-8, ... (the next power of two)."""
        return 1 << max(0, batch_size - 1).bit_length()

    def num_draft_tokens(self, batch_size: int, finish: Finish | None = None) -> int:
        """k for a step of batch_size decoding requests (0: no drafting). finish: with no
        request waiting, finish_gain's per-request figures (see the module note), or a
        function that lists them, called only when the decision weighs them."""
        if self.mode == "fixed":
            return self.k
        if batch_size > self.max_batch or batch_size < 1:
            return 0
        b = self.bucket(batch_size)
        st = self._buckets.setdefault(b, _Bucket())
        st.steps += 1
        spec, plain = self._estimates.get((b, self.k)), self._estimates.get((b, 0))
        if spec is None or plain is None:
            return self._measure(b, st, self.k if spec is None else 0)
        figures = finish() if callable(finish) else finish
        to_finish = finish_gain(figures, spec.tokens) if figures else None
        gain = spec.tokens if to_finish is None else min(spec.tokens, to_finish)
        spec_rate = gain / max(spec.seconds, 1e-9)
        best = self._choose(st, spec_rate, plain.rate)
        if gain < spec.tokens and self._choose(st, spec.rate, plain.rate) != best:
            st.finish_decided += 1  # what the mean gain alone would have chosen differs
        ratio = (plain.rate / spec_rate) if best else (spec_rate / plain.rate)  # the other over the choice
        if best != st.choice or not st.judged:  # a change of mind, or the first judgement
            st.choice, st.judged, st.probe_left = best, True, 0
            st.interval = self._first_interval(ratio, st, plain)
            st.probe_at = st.steps + st.interval
        if not st.probe_left and st.steps >= st.probe_at:
            st.probe_left, st.probe_ratio = PROBE_STEPS, ratio
        if not st.probe_left:
            return best
        st.probe_left -= 1
        if not st.probe_left:  # the probe's last step: when the next comes
            other = spec if best == 0 else plain
            if other.samples >= PROBE_HORIZON and ratio > SHIFT * st.probe_ratio:
                st.interval = PROBE_EVERY  # the other option gained: the text or the load changed
            else:
                st.interval = max(min(2 * st.interval, MAX_PROBE_EVERY), self._first_interval(ratio, st, plain))
            st.probe_at = st.steps + st.interval
        return self.k - best  # the other option

    def _choose(self, st: _Bucket, spec_rate: float, plain_rate: float) -> int:
        """k or 0: keep the bucket's choice unless the other option is better by MARGIN."""
        if st.choice == self.k:
            return 0 if plain_rate > (1 + MARGIN) * spec_rate else self.k
        if st.choice == 0:
            return self.k if spec_rate > (1 + MARGIN) * plain_rate else 0
        return self.k if spec_rate > plain_rate else 0

    def finish_decided(self, batch_size: int) -> int:
        """Decisions in this batch size's bucket that finish_gain turned (drafting's mean
        gain alone would have chosen the other option)."""
        st = self._buckets.get(self.bucket(batch_size))
        return st.finish_decided if st else 0

    def _measure(self, b: int, st: _Bucket, missing: int) -> int:
        """A bucket short of one estimate: measure `missing` at once if nothing was judged
        anywhere, else follow the nearest judged bucket until its first probe."""
        if st.choice == -1:
            judged = [(abs(c.bit_length() - b.bit_length()), c) for c, s in self._buckets.items() if s.judged]
            if not judged:
                return missing
            distance, near = min(judged)
            st.choice = self._buckets[near].choice
            # Its first probe when the neighbour's would come (soon near break-even, late
            # where the neighbour's choice wins by far), halved for each further doubling
            # of the batch between them: a distant neighbour says less.
            spec, plain = self._estimates[(near, self.k)], self._estimates[(near, 0)]
            ratio = (plain.rate / spec.rate) if st.choice else (spec.rate / plain.rate)
            wait = self._first_interval(ratio, self._buckets[near], plain) >> (distance - 1)
            st.probe_at = st.steps + max(PROBE_EVERY, wait)
        return missing if st.steps >= st.probe_at else st.choice

    @staticmethod
    def _first_interval(ratio: float, st: _Bucket, plain: _Estimate) -> int:
        """Steps to the first probe after a judgement: what a probe would cost (in steps'
        worth of output: its steps of the worse option, and the drafter's catch-up) over
        PROBE_BUDGET."""
        cost = PROBE_STEPS * max(0.0, 1.0 - ratio) + st.catch_up / max(plain.seconds, 1e-9)
        return max(PROBE_EVERY, min(MAX_PROBE_EVERY, int(cost / PROBE_BUDGET)))

    def record_step(self, batch_size: int, k: int, seconds: float, tokens_per_request: float) -> None:
        """A pure-decode step of batch_size requests drafted with k (0: none) took `seconds`
        and gained `tokens_per_request` tokens per request on average."""
        if self.mode == "fixed" or batch_size < 1:
            return
        b = self.bucket(batch_size)
        st = self._buckets.setdefault(b, _Bucket())
        after_plain, st.last_recorded = not st.last_recorded, k
        est = self._estimates.get((b, k))
        if k and after_plain:  # the drafter's catch-up step: not a drafting step's cost
            if est is not None:
                st.catch_up += 0.5 * (max(0.0, seconds - est.seconds) - st.catch_up)
            return
        if est is None:
            self._estimates[(b, k)] = _Estimate(seconds, tokens_per_request)
        else:
            est.update(seconds, tokens_per_request, PROBE_HORIZON if st.choice not in (-1, k) else HORIZON)

    def speedup(self, batch_size: int) -> float | None:
        """The measured tokens/s of drafting over not drafting at this batch size (None until
        both were measured)."""
        b = self.bucket(batch_size)
        spec, plain = self._estimates.get((b, self.k)), self._estimates.get((b, 0))
        return spec.rate / plain.rate if spec and plain else None
