"""RuntimeEndpoint: programs run against a `runtime up` server through `AsyncClient`. The
client lives on one event loop in a background thread; program threads (forks, run_batch)
submit coroutines to it, so their requests are in flight at once and the server batches
them. A fork's branches share the prefix's KV on the server: prefix-aware routing sends
them to the prefill worker that cached it (cache_prefix ran first)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Coroutine
from typing import Any

from runtime.client import APIError, AsyncClient
from runtime.common.continuations import ContinuationScore
from runtime.common.sampling_params import SamplingParams
from runtime.lang.backend.base import Backend, BackendError, GenOutput, OnText

POLL_S = 0.05  # how often a waiting caller checks its cancel flag


def completion_fields(p: SamplingParams) -> dict[str, Any]:
    """The /v1/completions fields of a gen's sampling params."""
    body: dict[str, Any] = {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                            "ignore_eos": p.ignore_eos, "skip_special_tokens": p.skip_special_tokens}
    if p.top_k > 0:
        body["top_k"] = p.top_k
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.regex is not None:
        body["regex"] = p.regex
    if p.ebnf is not None:
        body["ebnf"] = p.ebnf
    if p.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "gen", "schema": json.loads(p.json_schema)}}
    return body


class RuntimeEndpoint(Backend):
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lang-endpoint", daemon=True)
        self._thread.start()
        self.client: AsyncClient = self._call(self._make_client(url, api_key, timeout))

    @staticmethod
    async def _make_client(url: str, api_key: str | None, timeout: float) -> AsyncClient:
        return AsyncClient(url, api_key=api_key, timeout=timeout, return_token_ids=False)

    # ---- Backend --------------------------------------------------------------------------
    def generate(self, prompt: str, params: SamplingParams, on_text: OnText | None = None,
                 cancel: threading.Event | None = None) -> GenOutput:
        out = self._call(self._generate(prompt, params, on_text), cancel)
        if out is None:  # cancelled: the stream was closed, which the server takes as an abort
            return GenOutput("", "abort", 0, 0, 0)
        return out

    async def _generate(self, prompt: str, params: SamplingParams, on_text: OnText | None) -> GenOutput:
        text, reason, usage = [], None, {}
        async with self.client.generate(prompt, **completion_fields(params)) as stream:
            async for chunk in stream:
                if chunk.text:
                    text.append(chunk.text)
                    if on_text is not None:
                        on_text(chunk.text)
                reason = chunk.finish_reason or reason
                usage = chunk.usage or usage
        details = usage.get("prompt_tokens_details") or {}
        return GenOutput("".join(text), reason or "abort", usage.get("prompt_tokens", 0),
                         details.get("cached_tokens") or 0, usage.get("completion_tokens", 0))

    def score(self, prompt: str, continuations: list[str]) -> list[ContinuationScore]:
        body = self._call(self.client.post("/v1/score", {"prompt": prompt, "continuations": list(continuations)}))
        cached = (body.get("usage") or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
        per = cached // max(1, len(body["data"]))  # usage sums the continuations' cache hits
        return [ContinuationScore(d["token_ids"], d["logprobs"], per) for d in body["data"]]

    def cache_prefix(self, prompt: str) -> None:
        self._call(self.client.complete(prompt, max_tokens=1, temperature=0.0))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._call(self.client.post("/v1/chat/template", {"messages": messages}))["prompt"]

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # ---- threads -> the loop ----------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, Any], cancel: threading.Event | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            while True:
                try:
                    return fut.result(POLL_S)
                except concurrent.futures.TimeoutError:
                    if cancel is not None and cancel.is_set():
                        fut.cancel()  # closes the stream: the gateway aborts the request
                        cancel = None
                except concurrent.futures.CancelledError:
                    return None
        except APIError as e:
            raise BackendError(f"the server answered {e}") from e
