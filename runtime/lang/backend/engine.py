"""EngineBackend: programs run on a `runtime.Engine` in this process. One driver thread owns
the engine: calls from a program's forks (threads) are queued to it and added to the same
continuous batch, so a fork's branches decode together and share the prefix's pages
through the engine's radix cache."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from runtime.common.continuations import ContinuationScore, split_continuations
from runtime.common.detokenizer import IncrementalDetokenizer
from runtime.common.sampling_params import SamplingParams
from runtime.engine.request import Req
from runtime.lang.backend.base import Backend, BackendError, GenOutput, OnText

POLL_S = 0.05  # how often a waiting caller checks its cancel flag


@dataclass
class _Job:
    ids: list[int]
    params: SamplingParams
    on_text: OnText | None = None
    done: threading.Event = field(default_factory=threading.Event)
    req: Req | None = None
    detok: IncrementalDetokenizer | None = None
    text: list[str] = field(default_factory=list)
    stopped: bool = False  # ended by a stop string (the engine's request was aborted)
    error: BaseException | None = None


class EngineBackend(Backend):
    def __init__(self, engine: Any) -> None:  # a runtime.Engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._inbox: queue.Queue[tuple[str, list[_Job]]] = queue.Queue()
        self._active: dict[str, _Job] = {}
        self._thread = threading.Thread(target=self._drive, name="lang-engine", daemon=True)
        self._thread.start()

    # ---- Backend --------------------------------------------------------------------------
    def generate(self, prompt: str, params: SamplingParams, on_text: OnText | None = None,
                 cancel: threading.Event | None = None) -> GenOutput:
        job = _Job(self.engine._encode(prompt), params, on_text)
        self._wait([job], cancel)
        req = job.req
        reason = "stop" if job.stopped else req.finish_reason or "abort"
        return GenOutput("".join(job.text), reason, len(req.prompt_ids), req.cached_tokens, len(req.output_ids))

    def score(self, prompt: str, continuations: list[str]) -> list[ContinuationScore]:
        ctx, conts = split_continuations(self.engine._encode, prompt, continuations)
        if len(conts) > 1:
            self._wait([_Job(ctx, SamplingParams(max_tokens=1, temperature=0.0))])
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs_start=len(ctx))
        jobs = [_Job(ctx + c, params) for c in conts]
        self._wait(jobs)
        return [ContinuationScore(c, j.req.prompt_logprob_list(), j.req.cached_tokens) for c, j in zip(conts, jobs)]

    def cache_prefix(self, prompt: str) -> None:
        self._wait([_Job(self.engine._encode(prompt), SamplingParams(max_tokens=1, temperature=0.0))])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise BackendError("this model has no chat template: role blocks need one")
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def close(self) -> None:
        self._inbox.put(("stop", []))
        self._thread.join(5)

    # ---- the caller's side ------------------------------------------------------------------
    def _wait(self, jobs: list[_Job], cancel: threading.Event | None = None) -> None:
        if not self._thread.is_alive():
            raise BackendError("the engine backend is closed")
        self._inbox.put(("add", jobs))  # one message: added before the same step, one batch
        for job in jobs:
            while not job.done.wait(POLL_S):
                if cancel is not None and cancel.is_set():
                    self._inbox.put(("abort", [job]))
                    cancel = None  # once
        for job in jobs:
            if job.error is not None:
                raise BackendError(str(job.error)) from job.error

    # ---- the driver thread ------------------------------------------------------------------
    def _drive(self) -> None:
        core = self.engine.core
        while True:
            try:
                kind, jobs = self._inbox.get(timeout=None if not self._active else 0.0)
            except queue.Empty:
                kind, jobs = "", []
            if kind == "stop":
                for job in list(self._active.values()):
                    core.abort(job.req.rid)
                    self._end(job, BackendError("the engine backend was closed"))
                return
            if kind == "add":
                for job in jobs:
                    self._add(job)
            elif kind == "abort":
                for job in jobs:
                    if job.req is not None and job.req.rid in self._active:
                        core.abort(job.req.rid)
                        self._end(job)
            if not self._inbox.empty() or not self._active:
                continue
            try:
                outputs = core.step()
            except BaseException as e:  # a bug: fail every caller instead of hanging them
                for job in list(self._active.values()):
                    core.abort(job.req.rid)
                    self._end(job, e)
                continue
            for out in outputs:
                job = self._active.get(out.req.rid)
                if job is not None:
                    self._advance(job, out)

    def _add(self, job: _Job) -> None:
        try:
            job.req, job.detok = self.engine._add(job.ids, job.params)
        except Exception as e:  # bad input (a grammar that does not compile, a prompt too long)
            self._end(job, e)
            return
        self._active[job.req.rid] = job

    def _advance(self, job: _Job, out: Any) -> None:
        req = job.req
        if out.error is not None:
            self._end(job, BackendError(out.error))
            return
        if job.detok is not None:
            delta = job.detok.add(out.new_token_ids, final=req.finished)
            if job.detok.stopped_by is not None and not req.finished:
                self.engine.core.abort(req.rid)
                job.stopped = True
            if delta:
                job.text.append(delta)
                if job.on_text is not None:
                    job.on_text(delta)
        if req.finished:
            self._end(job)

    def _end(self, job: _Job, error: BaseException | None = None) -> None:
        job.error = error
        if job.req is not None:
            self._active.pop(job.req.rid, None)
        job.done.set()
