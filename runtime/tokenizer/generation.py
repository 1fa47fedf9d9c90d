"""One HTTP request's generations in flight: n x prompts sub-requests sent to the controller,
their TokenDeltas turned into text by an IncrementalDetokenizer per choice, stop strings
checked here (a hit sends Abort), and the request's latency metrics."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.common.detokenizer import IncrementalDetokenizer
from runtime.common.sampling_params import SamplingParams
from runtime.messages import RequestError, TokenDelta, params_to_dict
from runtime.tokenizer.protocol import APIError
from runtime.tokenizer.state import GatewayState, Ticket

log = logging.getLogger("runtime.gateway")

POLL_S = 0.5  # how often a waiting request checks the client and the controller
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


class ClientGone(Exception):
    """The HTTP client disconnected; the request was aborted."""


@dataclass
class Choice:
    index: int
    rid: str
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # kept tokens (cut at a stop string)
    logprobs: list[Any] = field(default_factory=list)  # per kept token: [logprob, [[id, logprob], ...]]
    cached_tokens: int = 0
    prompt_logprobs: list[float] = field(default_factory=list)  # scoring requests (POST /v1/score)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_time: float | None = None
    last_time: float | None = None

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Update:
    """What one TokenDelta added to one choice."""

    choice: Choice
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    finished: bool


def merge_updates(updates: list[Update]) -> list[Update]:
    """One update per choice, in the order the choices first appear: each choice's text,
    tokens and logprobs concatenated in order, finished if its last update was. (A chunk
    function reads the choice's whole text so far, which is the text after its last update.)"""
    merged: dict[int, Update] = {}
    for u in updates:
        m = merged.get(id(u.choice))
        if m is None:
            merged[id(u.choice)] = Update(u.choice, u.text, list(u.token_ids), u.logprobs, u.finished)
            continue
        m.text += u.text
        m.token_ids += u.token_ids
        if u.logprobs is not None or m.logprobs is not None:
            m.logprobs = list(m.logprobs or []) + list(u.logprobs or [])
        m.finished = u.finished
    return list(merged.values())


class Generation:
    """Usage: `await gen.start()`, then `await gen.next()` until it returns None; always
    `gen.close()` in a `finally` (aborts whatever has not finished)."""

    def __init__(
        self,
        state: GatewayState,
        request_id: str,
        prompts: list[tuple[list[int], SamplingParams]],
        arrival: float | None = None,
        ticket: Ticket | None = None,  # the request's room in the queues, released by close()
    ) -> None:
        self.state = state
        self.ticket = ticket
        self.request_id = request_id
        self.arrival = arrival if arrival is not None else time.monotonic()
        self.prompts = [ids for ids, _ in prompts]
        self.choices: list[Choice] = []
        for p, (ids, params) in enumerate(prompts):
            for i in range(params.n):
                # n samples of one prompt need distinct seeds to differ.
                seed = params.seed + i if params.seed is not None else None
                sub = dataclasses.replace(params, n=1, seed=seed)
                index = p * params.n + i
                detok = IncrementalDetokenizer(state.tokenizer, sub.skip_special_tokens, sub.stop, incremental=True)
                self.choices.append(Choice(index, f"{request_id}-{index}", p, ids, sub, detok))
        self.by_rid = {c.rid: c for c in self.choices}
        self.unfinished = len(self.choices)
        self.queue: asyncio.Queue[TokenDelta | RequestError] | None = None
        self._closed = False
        self._next_check = time.monotonic() + POLL_S

    async def start(self) -> None:
        if not self.state.controller_alive():
            raise APIError(503, "the controller is not answering; try again shortly")
        self.queue = self.state.open(list(self.by_rid))
        m = self.state.metrics
        m.prompt_tokens.inc(sum(len(ids) for ids in self.prompts))
        m.running.inc(len(self.choices))
        for c in self.choices:
            await self.state.submit(c.rid, c.prompt_ids, params_to_dict(c.params))

    async def next(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Update | None:
        """The next update of any choice; None when every choice has finished. Raises
        APIError for a RequestError or a silent controller, ClientGone on disconnect."""
        assert self.queue is not None, "start() first"
        while self.unfinished:
            update = self._handle(await self._receive(is_disconnected))
            if update is not None:
                return update
        return None

    def next_ready(self) -> Update | None:
        """Like next(), from the messages already received only: None when no update is
        there yet (a stream then sends what it has instead of waiting)."""
        assert self.queue is not None, "start() first"
        while self.unfinished and not self.queue.empty():
            update = self._handle(self.queue.get_nowait())
            if update is not None:
                return update
        return None

    def _handle(self, msg: TokenDelta | RequestError) -> Update | None:
        c = self.by_rid.get(msg.rid)
        if c is None or c.finished:
            return None
        if isinstance(msg, RequestError):
            log.info("request %s failed (%d): %s", msg.rid, msg.code, msg.message)
            c.finish_reason = "error"
            self.unfinished -= 1
            self.state.metrics.running.dec()
            self.state.close(msg.rid)
            raise APIError(msg.code, msg.message)
        return self._apply(c, msg)

    def close(self) -> None:
        """Abort every unfinished sub-request and forget the request (idempotent, sync)."""
        if self._closed:
            return
        self._closed = True
        if self.ticket is not None:
            self.ticket.release()
        if self.queue is None:  # never started: nothing was sent or counted
            return
        for c in self.choices:
            if c.finished:
                self.state.close(c.rid)
            else:
                self.state.abort(c.rid)
        self.state.metrics.running.dec(self.unfinished)
        self.unfinished = 0

    # ---- internals ---------------------------------------------------------------------------
    async def _receive(self, is_disconnected: Callable[[], Awaitable[bool]] | None) -> TokenDelta | RequestError:
        assert self.queue is not None
        while True:
            # Every POLL_S, busy or not: is the client still there, is the controller alive?
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + POLL_S
                if is_disconnected is not None and await is_disconnected():
                    log.info("client of %s disconnected: aborting", self.request_id)
                    raise ClientGone(self.request_id)
                if self.queue.empty() and not self.state.controller_alive():
                    raise APIError(503, "the controller stopped answering; try again shortly")
            if not self.queue.empty():
                return self.queue.get_nowait()
            try:
                return await asyncio.wait_for(self.queue.get(), max(0.0, self._next_check - time.monotonic()))
            except TimeoutError:
                pass

    def _apply(self, c: Choice, msg: TokenDelta) -> Update | None:
        final = msg.finish_reason is not None
        ids = list(msg.token_ids)
        detok = c.detok
        if detok.stop:
            # Token by token, so tokens after a stop string are dropped with their text.
            pieces, kept = [], 0
            for j, t in enumerate(ids):
                pieces.append(detok.add([t], final=final and j == len(ids) - 1))
                kept = j + 1
                if detok.stopped_by is not None:
                    break
            if not ids:
                pieces.append(detok.add([], final=final))
            text = "".join(pieces)
        else:
            text = detok.add(ids, final=final)
            kept = len(ids)
        ids = ids[:kept]
        lps = list(msg.logprobs[:kept]) if msg.logprobs is not None else None
        c.token_ids += ids
        if lps:
            c.logprobs += lps
        c.cached_tokens = msg.cached_tokens
        if msg.prompt_logprobs:
            c.prompt_logprobs = list(msg.prompt_logprobs)
        now = time.monotonic()
        m = self.state.metrics
        if ids:
            if c.first_time is None:
                c.first_time = now
                m.ttft.observe(now - self.arrival)
            elif c.last_time is not None:
                m.itl.observe(now - c.last_time)
            c.last_time = now
            m.generation_tokens.inc(len(ids))
        if detok.stopped_by is not None:
            c.finish_reason, c.stop_reason = "stop", detok.stopped_by
            if final:
                self.state.close(c.rid)
            else:
                self.state.abort(c.rid)  # the worker would go on to max_tokens otherwise
        elif final:
            c.finish_reason = FINISH_REASONS.get(str(msg.finish_reason), str(msg.finish_reason))
            c.stop_reason = msg.stop_reason
            self.state.close(c.rid)
        if c.finished:
            self.unfinished -= 1
            m.running.dec()
            m.e2e.observe(now - self.arrival)
            m.requests.labels(c.finish_reason).inc()
        if not text and not ids and not c.finished:
            return None
        return Update(c, text, ids, lps, c.finished)

    # ---- usage -----------------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = [0] * len(self.prompts)
        for c in self.choices:
            cached[c.prompt_index] = max(cached[c.prompt_index], c.cached_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached)},
        }
