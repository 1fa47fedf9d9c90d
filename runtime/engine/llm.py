"""`runtime.Engine`: offline batch inference in one process (no HTTP), the INTERFACE.md API."""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.common.continuations import ContinuationScore, split_continuations
from runtime.common.detokenizer import IncrementalDetokenizer
from runtime.common.logprobs import TokenLogprob
from runtime.common.sampling_params import SamplingParams
from runtime.config import EngineConfig
from runtime.engine.core import EngineCore
from runtime.engine.request import Req

Prompt = str | Sequence[int]


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "error" (see `error`)
    prompt_tokens: int
    cached_tokens: int
    accept_length: float  # mean tokens per decode step; 1.0 without speculation
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None  # with finish_reason "error": what failed (its step ran out of memory)
    # With SamplingParams.prompt_logprobs_start: the logprob of each prompt token from there on.
    prompt_logprobs: list[float] = field(default_factory=list)


class GenerationError(RuntimeError):
    """`Engine.stream`: the generation failed (its engine step ran out of memory)."""


class Engine:
    """Keyword arguments are the `EngineConfig` fields (the CLI flags' names)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        self.core = EngineCore(self.config)
        self.tokenizer = self.core.loaded.tokenizer
        self._ids = itertools.count()

    # ---- the public API ------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Result]:
        """One result per prompt (n > 1: n consecutive results per prompt). All prompts are
        scheduled together (continuous batching). `params`: one SamplingParams for every
        prompt, or a sequence of them, one per prompt (as vLLM's generate takes).

        A prompt whose engine step ran out of memory gets a result with finish_reason
        "error", `error` saying so, and the tokens it had so far; the other prompts' results
        are complete. It does not raise: one prompt's failure does not cost the batch the
        rest of its work. Check finish_reason, and retry those alone or shorter."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([self._encode(p) for p in prompts], params)

    def chat(self, conversations: list[list[dict[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Result]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        return self._run([self.apply_chat_template(c) for c in conversations], params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one generation as they are produced. Raises GenerationError when
        its engine step runs out of memory (after the deltas produced until then)."""
        params = params or SamplingParams()
        req, detok = self._add(self._encode(prompt), params)
        while not req.finished:
            for out in self.core.step():
                if out.req is req and out.error is not None:
                    raise GenerationError(out.error)
                if out.req is req:
                    delta = detok.add(out.new_token_ids, final=req.finished)
                    if detok.stopped_by is not None and not req.finished:
                        self.core.abort(req.rid)
                    if delta:
                        yield delta

    def score(self, prompt: Prompt, continuations: Sequence[str] | Sequence[list[int]]) -> list[ContinuationScore]:
        """The logprob of each token of each continuation after `prompt` (runtime/common/
        continuations.py says how text is split into tokens). The prompt is prefilled once (or
        found in the prefix cache); the continuations then run as one batched prefill
        whose requests share the prompt's KV pages, not one generation each."""
        ctx, conts = split_continuations(self._encode, prompt, continuations)
        if len(conts) > 1 and self.config.prefix_cache:
            self._run([ctx], SamplingParams(max_tokens=1, temperature=0.0))  # leaves its KV in the cache
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs_start=len(ctx))
        results = self._run([ctx + c for c in conts], params)
        for r in results:
            if r.finish_reason == "error":
                raise GenerationError(r.error or "scoring failed")
        return [ContinuationScore(c, r.prompt_logprobs, r.cached_tokens) for c, r in zip(conts, results)]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def shutdown(self) -> None:
        for rid in list(self.core.requests):
            self.core.abort(rid)
        self.core.cache.reset()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals -----------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights?): pass token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def _add(self, ids: list[int], params: SamplingParams) -> tuple[Req, IncrementalDetokenizer | None]:
        req = self.core.add_request(f"offline-{next(self._ids)}", ids, params)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop)
        return req, detok

    def _run(self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None) -> list[Result]:
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts) or not all(isinstance(p, SamplingParams) for p in per_prompt):
                raise ValueError(f"params: one SamplingParams, or a sequence of one per prompt ({len(prompts)} "
                                 f"prompts, {len(per_prompt)} given)")
        added = []
        errors: dict[str, str] = {}  # rid -> why it failed
        try:
            for ids, sp in zip(prompts, per_prompt):
                for i in range(sp.n):
                    # n samples of one prompt need distinct seeds to differ.
                    p = sp if sp.n == 1 or sp.seed is None else replace(sp, seed=sp.seed + i, n=1)
                    added.append(self._add(ids, p))
            watched = {req.rid: (req, detok) for req, detok in added if detok is not None and req.params.stop}
            while any(not req.finished for req, _ in added):
                for out in self.core.step():
                    if out.error is not None:
                        errors[out.req.rid] = out.error
                        continue
                    entry = watched.get(out.req.rid)
                    if entry is not None:
                        _, detok = entry
                        detok.add(out.new_token_ids, final=out.req.finished)
                        if detok.stopped_by is not None and not out.req.finished:
                            self.core.abort(out.req.rid)
                            out.req.finish_reason = "stop"
        except BaseException:
            for req, _ in added:
                self.core.abort(req.rid)
            raise
        return [self._result(req, detok, errors.get(req.rid)) for req, detok in added]

    def _result(self, req: Req, detok: IncrementalDetokenizer | None, error: str | None = None) -> Result:
        text = ""
        stop_reason = req.stop_reason
        if detok is not None:
            if req.params.stop:
                text = detok.text if detok.stopped_by is not None else detok.text + detok.add([], final=True)
                if detok.stopped_by is not None:
                    stop_reason = detok.stopped_by
            else:
                text = self.tokenizer.decode(req.output_ids, skip_special_tokens=req.params.skip_special_tokens)
        return Result(
            text=text,
            token_ids=list(req.output_ids),
            finish_reason=req.finish_reason or "abort",
            prompt_tokens=len(req.prompt_ids),
            cached_tokens=req.cached_tokens,
            accept_length=req.accept_length,
            stop_reason=stop_reason,
            logprobs=list(req.output_logprobs),
            error=error,
            prompt_logprobs=req.prompt_logprob_list(),
        )
