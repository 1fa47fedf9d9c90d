"""The overlap schedule (EngineConfig.overlap_schedule): each step is launched before the
host has read the previous step's tokens, so the host's work between two forwards (reading
the tokens, stop checks, outputs, the worker's sends, scheduling, building the next rows)
runs while the GPU computes instead of in a gap between forwards (issue 14: at batch 256
the 8B step's host part was ~1.9 ms of ~17 on the H200).

How a step goes (`_step_overlapped`), with step N in flight:
1. Schedule N+1 as if N's requests had their tokens: at N's launch each request that
   samples got a placeholder token -(1 + j) (j: its row in N's sampled tokens) and was
   advanced, so lengths, pages and positions are already right. A row whose input is a
   placeholder takes N's token on the device (runner.build_rows' future_rows).
2. Launch N+1: the forward, sampling, and a non-blocking copy of the tokens (and logprobs)
   to pinned host memory with an event after it; then placeholders and advances for N+1.
3. Settle N: wait for N's event (its copy was queued before N+1's forward, so the GPU
   keeps working), put the real tokens in place of the placeholders, run the stop checks,
   emit N's outputs. A request N ended (EOS, stop token, length) also got a row in N+1:
   its placeholder is dropped and that row's result ignored; its pages are freed now,
   which is safe because the GPU runs N+1 before any later step that reuses them.

Only steps where nothing needs the host to see the previous token first take this path:
no drafting (no drafter, or an n-gram drafter above the adaptive policy's batch limit), no
grammar, no prompt logprobs, no held KV (prefill workers); penalties, which count the
output tokens, get the token in flight added to their tables on the device. Otherwise the
step in flight is settled first and the step runs as before (`EngineCore.step`). A step
that runs out of memory at launch settles the step in flight, then fails its own requests
as the plain path does.

A mixin: its methods read EngineCore's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from runtime.engine.alloc_failure import is_alloc_failure, maybe_inject_alloc_failure
from runtime.engine.h2d import to_device
from runtime.engine.request import Phase, Req
from runtime.engine.sampler import SampleOutput, plain_greedy
from runtime.engine.scheduler import Batch, ScheduledSeq


@dataclass
class Launched:
    """A step whose forward and sampling are queued on the device and not yet read."""

    seqs: list[ScheduledSeq]  # the sequences that sampled a token, in row order
    at: list[int]  # per seq: the index of its placeholder in req.output_ids
    decode: list[bool]  # per seq: a decode row (counted as a decode step of the request)
    tokens: torch.Tensor  # int64 [len(seqs)] on the device: what later rows' placeholders read
    host: SampleOutput  # the same tokens (and logprobs) in pinned host memory, valid after `ready`
    ready: torch.cuda.Event | None  # recorded after the copies (None on CPU: already there)


def overlap_eligible(req: Req) -> bool:
    """Whether a request's next step may be launched before its last token is read."""
    return req.grammar is None and not req.hold_kv and req.params.prompt_logprobs_start is None


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A device tensor copied into pinned host memory without waiting (CPU: itself)."""
    if t is None or not t.is_cuda:
        return t
    return t.to("cpu", non_blocking=True)


class OverlapSteps:
    _inflight: Launched | None = None

    def _overlap_now(self) -> bool:
        """Whether this step may take the overlap path (module note)."""
        if not self.cfg.overlap_schedule or self.cfg.export_prompt_hidden:
            return False
        if self.drafter is not None and not self._drafter_idle():
            return False
        s = self.scheduler
        return not self.compiling and all(overlap_eligible(r) for r in chain(s.running, s.waiting))

    def _drafter_idle(self) -> bool:
        """Whether the step would draft nothing whatever its requests hold, with a drafter
        that loses nothing by skipping it: the adaptive policy never drafts for more decoding
        requests than its max batch, and a drafter with no per-step state (n-gram: it reads
        the requests' tokens when it proposes, all known by then) needs no step's results.
        So speculation at high load keeps the overlap's gain (issue 18: never below no
        speculation); once the batch shrinks, the step in flight is settled and drafting
        resumes."""
        p, d = self.policy, self.drafter
        if p.mode != "adaptive" or d.reads_hidden or d.wants_prompt_hidden or self._observes:
            return False
        return sum(r.phase is Phase.DECODE for r in self.scheduler.running) > p.max_batch

    def _step_overlapped(self) -> list:
        from runtime.engine.core import StepOutput

        batch = self.scheduler.schedule()
        ended = list(self.scheduler.ended)  # ended by the scheduler (no room): maybe with a token in flight
        self.scheduler.ended.clear()
        for r in ended:
            self.requests.pop(r.rid, None)
        launched, failed = None, []
        if batch.seqs:
            try:
                launched = self._launch(batch)
            except Exception as e:
                if not is_alloc_failure(e):
                    raise
                failed = [e]
        prev, self._inflight = self._inflight, launched
        outputs, late = self._settle(prev) if prev is not None else ([], {})
        # A request the scheduler ended still gets the token its last step sampled, in its final output.
        outputs += [StepOutput(r, *late.get(r.rid, ([], []))) for r in ended]
        if failed:  # after the step before was settled: it keeps its tokens
            # (requests that step ended are gone; the rest fail or run again as in the plain step)
            outputs += self._fail_alloc([s for s in batch.seqs if not s.req.finished], failed[0], rerun_decode=True)
            self._empty_device_cache()
        return outputs

    def _launch(self, batch: Batch) -> Launched:
        """Queue the batch's forward and sampling and the copy of its tokens to the host; then
        give every sampling request its placeholder and advance every sequence, as the plain
        step does after reading the tokens."""
        prev = self._inflight
        out = self.runner.forward(batch, future_tokens=prev.tokens if prev is not None else None)
        self.num_forwards += 1
        maybe_inject_alloc_failure(self.num_forwards, batch.num_tokens)
        seqs = [s for s in batch.seqs if s.num_logits]
        reqs = [s.req for s in seqs]
        if all(plain_greedy(r.params) for r in reqs):
            sampled = SampleOutput(out.logits.argmax(dim=-1), None, None, None)
        else:
            sampled = self.sampler(out.logits, self._overlap_sampling_batch(reqs, prev))
        host = SampleOutput(*(_to_host(t) for t in (sampled.tokens, sampled.logprobs, sampled.top_ids,
                                                      sampled.top_logprobs)))
        ready = None
        if sampled.tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(sampled.tokens.device))
        at, decode = [], []
        sampling = {id(s) for s in seqs}
        j = 0
        for s in batch.seqs:
            req = s.req
            if id(s) not in sampling:  # a prefill chunk with more to come
                self.scheduler.advance(s, s.start + s.q_len)
                continue
            decode.append(req.phase is Phase.DECODE)
            at.append(len(req.output_ids))
            req.output_ids.append(-1 - j)
            req.num_pending += 1
            j += 1
            self.scheduler.advance(s, req.seq_len - 1)
        return Launched(seqs, at, decode, sampled.tokens, host, ready)

    def _overlap_sampling_batch(self, reqs: list[Req], prev: Launched | None):
        """The plain step's SamplingBatch for reqs, whose last output may be a placeholder of
        the step in flight: steps count it (as the plain path counts the token it stands
        for), and the penalties' token tables get that token on the device."""
        from runtime.engine.sampler import SamplingBatch

        params = [r.params for r in reqs]
        steps = [len(r.output_ids) for r in reqs]
        if not any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            return self._sampling_batch(reqs, steps)
        known = [r.output_ids[: r.num_output] for r in reqs]
        sb = SamplingBatch.build(params, [r.seed for r in reqs], steps, self.model_config.vocab_size, self.device,
                                 prompt_and_output_tokens=[r.prompt_ids + k for r, k in zip(reqs, known)],
                                 output_tokens=known)
        pending = [(i, -1 - r.output_ids[-1]) for i, r in enumerate(reqs) if r.num_pending]
        if pending:
            if prev is None:
                raise RuntimeError("a placeholder token with no step in flight")
            dev = prev.tokens.device
            rows = to_device([i for i, _ in pending], torch.int64, dev)
            toks = prev.tokens[to_device([j for _, j in pending], torch.int64, dev)]
            if sb.output_counts is not None:
                sb.output_counts.index_put_((rows, toks), torch.ones_like(toks, dtype=sb.output_counts.dtype),
                                            accumulate=True)
            if sb.seen_mask is not None:
                sb.seen_mask[rows, toks] = True
        return sb

    def _settle_inflight(self) -> list:
        prev, self._inflight = self._inflight, None
        return self._settle(prev)[0] if prev is not None else []

    def _settle(self, step: Launched) -> tuple[list, dict[str, tuple[list[int], list]]]:
        """Read a launched step's tokens, put them in place of its placeholders, and end the
        requests they end. Returns the step's outputs, and the tokens of requests the
        scheduler ended meanwhile (rid -> (tokens, logprobs): their final output carries them)."""
        from runtime.engine.core import StepOutput

        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.host.tokens.tolist()
        lps = self._logprobs([s.req for s in step.seqs], step.host, range(len(step.seqs)))
        outputs, late = [], {}
        for s, at, decode, t, lp in zip(step.seqs, step.at, step.decode, tokens, lps):
            req = s.req
            if req.finished:
                if req.num_pending and at < len(req.output_ids) and req.output_ids[at] < 0:
                    req.output_ids[at] = t  # the scheduler ended it (no room) while this step ran
                    req.num_pending -= 1
                    if decode:
                        self._count_accepted(req, 1, None, False)
                    if lp:
                        req.output_logprobs.append(lp)
                    late[req.rid] = ([t], [lp] if lp else [])
                continue  # else aborted or ended while this step ran: its row is void
            req.output_ids[at] = t
            req.num_pending -= 1
            if decode:
                self._count_accepted(req, 1, None, False)
            reason, stop_reason = self._stop_at(req, t, at + 1)
            if reason is not None:
                self._finish(req, reason, stop_reason)  # drops the placeholder of the step launched after
            logprobs = [lp] if lp else []
            if logprobs:
                req.output_logprobs += logprobs
            outputs.append(StepOutput(req, [t], logprobs))
        return outputs, late

    def _stop_at(self, req: Req, t: int, n: int) -> tuple[str | None, int | None]:
        """The plain path's stop rules (`_append`) for token t as the request's n-th output."""
        p = req.params
        if n >= p.min_tokens and not p.ignore_eos and t in self.eos_ids:
            return "stop", t
        if n >= p.min_tokens and t in p.stop_token_ids:
            return "stop", t
        if n >= p.max_tokens or len(req.prompt_ids) + n >= self.max_model_len:
            return "length", None
        return None, None

