"""When to speculate: measured, not guessed.

A speculative step costs more than a plain one (the drafter's work, a verify forward over
k+1 rows per request, acceptance) and gains `accept length` tokens per request instead of
one. Whether that pays depends on the model, the device, the batch size and the text
(copy-heavy text accepts long runs, open chat few), so `adaptive` measures it: per batch-
size bucket it keeps a running estimate of the wall time of pure-decode steps with and
without drafting and of the tokens each gains per request, and drafts only where that
yields more tokens per second.

Now and then a bucket runs the other option for PROBE_STEPS steps, weighted more than
routine steps, so a shift in the text or the load is noticed within one probe: PROBE_EVERY
steps after a change of mind, twice as long after each probe that confirms the choice, up
to MAX_PROBE_EVERY (a drafter that never pays then costs PROBE_STEPS steps in
MAX_PROBE_EVERY). The first drafting step after plain ones is not measured: stateful
drafters (EAGLE, a draft model) catch up there on the tokens they skipped, a cost steady
drafting does not pay. Above `max_batch` decoding requests it never drafts (the verify rows
would not fit the captured graphs). `fixed` always drafts k. Under both, the engine trims
drafts so that a verify step fits the decode graphs (EngineCore._propose).
"""
from __future__ import annotations

from dataclasses import dataclass

PROBE_EVERY = 16  # steps per bucket between two tries of the option not in use, at first
MAX_PROBE_EVERY = 256  # ... and at most, after probes that kept confirming the choice
PROBE_STEPS = 3  # a try's length (a drafter's first step, its catch-up, is not counted)
SMOOTHING = 0.2  # weight of the newest step in the running estimates
PROBE_SMOOTHING = 0.5  # ... and of a step of the option not in use


@dataclass
class _Estimate:
    seconds: float  # running estimate of one step's wall time
    tokens: float  # running estimate of the tokens one step gains per request

    @property
    def rate(self) -> float:
        """Tokens per request per second."""
        return self.tokens / max(self.seconds, 1e-9)

    def update(self, seconds: float, tokens: float, weight: float) -> None:
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens - self.tokens)


@dataclass
class _Bucket:
    steps: int = 0  # decisions taken
    choice: int = -1  # the option last judged best (-1: none yet)
    interval: int = PROBE_EVERY
    probe_at: int = PROBE_EVERY  # the step at which the next probe starts
    last_recorded: int = 0  # k of the last measured step (0: plain)


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

    def num_draft_tokens(self, batch_size: int) -> int:
        if self.mode == "fixed":
            return self.k
        if batch_size > self.max_batch or batch_size < 1:
            return 0
        b = self.bucket(batch_size)
        st = self._buckets.setdefault(b, _Bucket())
        st.steps += 1
        spec, plain = self._estimates.get((b, self.k)), self._estimates.get((b, 0))
        if spec is None:
            return self.k  # measure speculation first
        if plain is None:
            return 0
        best = self.k if spec.rate >= plain.rate else 0
        if best != st.choice:  # a change of mind (or the first judgement): re-check soon
            st.choice, st.interval = best, PROBE_EVERY
            st.probe_at = st.steps + PROBE_EVERY
        if st.steps >= st.probe_at:
            if st.steps == st.probe_at + PROBE_STEPS - 1:  # the probe's last step: the next further off
                st.interval = min(2 * st.interval, MAX_PROBE_EVERY)
                st.probe_at = st.steps + st.interval
            return self.k - best  # the other option
        return best

    def record_step(self, batch_size: int, k: int, seconds: float, tokens_per_request: float) -> None:
        """A pure-decode step of batch_size requests drafted with k (0: none) took `seconds`
        and gained `tokens_per_request` tokens per request on average."""
        if self.mode == "fixed" or batch_size < 1:
            return
        b = self.bucket(batch_size)
        st = self._buckets.setdefault(b, _Bucket())
        after_plain, st.last_recorded = not st.last_recorded, k
        if k and after_plain:
            return  # the drafter's catch-up step
        est = self._estimates.get((b, k))
        if est is None:
            self._estimates[(b, k)] = _Estimate(seconds, tokens_per_request)
        else:
            est.update(seconds, tokens_per_request, PROBE_SMOOTHING if st.choice not in (-1, k) else SMOOTHING)

    def speedup(self, batch_size: int) -> float | None:
        """The measured tokens/s of drafting over not drafting at this batch size (None until
        both were measured)."""
        b = self.bucket(batch_size)
        spec, plain = self._estimates.get((b, self.k)), self._estimates.get((b, 0))
        return spec.rate / plain.rate if spec and plain else None
