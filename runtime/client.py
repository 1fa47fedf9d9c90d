"""AsyncClient: a small streaming client for the gateway's OpenAI-compatible HTTP API.

    async with AsyncClient("http://127.0.0.1:8000") as client:
        async for chunk in client.chat([{"role": "user", "content": "hi"}], max_tokens=32):
            print(chunk.text, end="")
        text = await client.complete("Once upon a time", max_tokens=16)

Every call streams (SSE, `data: {...}` events until `data: [DONE]`).

Cancellation. Stopping early must close the HTTP stream, because closing the
connection is how the server learns to abort the request and free its KV pages.
`chat()` and `generate()` return a `Stream`: an async iterator over `Chunk`s that
is also an async context manager and has `aclose()`. Three ways to stop early:

* `async with client.generate(...) as stream: async for c in stream: ... break`
  closes the connection when the `with` block exits: deterministic, preferred.
* `async with contextlib.aclosing(client.generate(...)) as stream:` the same.
* a bare `async for c in client.generate(...): ... break` also works, but later:
  the abandoned async generator is finalized by the event loop's asyncgen hooks
  (asyncio schedules its `aclose()` as a task once the generator is garbage
  collected; in CPython that is on the next loop iteration, as soon as nothing
  references it, but an exception traceback or a variable that keeps the stream
  alive delays it). Its `finally` then closes the response.
Leaving the `AsyncClient` context closes every stream still open.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

__all__ = ["AsyncClient", "APIError", "APIConnectionError", "Chunk", "Stream"]


class APIError(Exception):
    """An OpenAI-style error object from the server (HTTP status, or 200 with an SSE
    `data: {"error": ...}` event when the request failed after streaming began)."""

    def __init__(
        self, status: int, message: str, type: str | None = None, param: str | None = None, code: Any = None
    ) -> None:
        super().__init__(f"{status} {type or 'error'}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class APIConnectionError(APIError):
    """The server could not be reached or dropped the connection (status 0)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message, "connection_error")


@dataclass
class Chunk:
    """One streamed piece of output. The last chunks carry `finish_reason`
    ("stop" | "length") and, when the server sends usage, `usage`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # [] when the server does not send them
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    index: int = 0  # which of the `n` choices

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


def _error_from_body(status: int, body: bytes) -> APIError:
    """Map an error response to APIError: the OpenAI error object when present, else
    FastAPI's `{"detail": ...}`, else the raw text."""
    try:
        obj = json.loads(body)
    except ValueError:
        return APIError(status, body.decode("utf-8", "replace").strip() or f"HTTP {status}")
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return _error_from_object(status, obj["error"])
    if isinstance(obj, dict) and "detail" in obj:
        return APIError(status, json.dumps(obj["detail"]) if not isinstance(obj["detail"], str) else obj["detail"])
    return APIError(status, json.dumps(obj))


def _error_from_object(status: int | None, err: dict[str, Any]) -> APIError:
    code = err.get("code")
    if status is None:
        # An SSE error event comes after the 200 header: vLLM/SGLang put the status in
        # `code`; without one, the request failed on the server's side.
        status = code if isinstance(code, int) else 500
    return APIError(status, str(err.get("message", "")), err.get("type"), err.get("param"), code)


async def _sse_events(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` payloads of a text/event-stream, per the SSE spec: `data:` lines
    accumulate until a blank line; comments (`:`) and other fields are ignored."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _chunks(event: dict[str, Any], chat: bool) -> list[Chunk]:
    usage = event.get("usage")
    out: list[Chunk] = []
    for choice in event.get("choices") or []:
        text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
        ids = choice.get("token_ids") or []
        finish = choice.get("finish_reason")
        if text or ids or finish:
            out.append(Chunk(text, list(ids), finish, None, int(choice.get("index") or 0)))
    if usage:
        if out:
            out[-1].usage = usage
        else:
            out.append(Chunk(usage=usage))
    return out


class Stream:
    """Async iterator of `Chunk`s over one streaming request; also an async context
    manager (and `aclose()`), which closes the HTTP stream on exit."""

    def __init__(self, agen: AsyncIterator[Chunk]) -> None:
        self._agen = agen
        self.usage: dict[str, Any] | None = None  # set when the usage chunk arrives

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        chunk = await self._agen.__anext__()
        if chunk.usage is not None:
            self.usage = chunk.usage
        return chunk

    async def aclose(self) -> None:
        await self._agen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncClient:
    """Streaming client for /v1/completions and /v1/chat/completions.

    `base_url` is the server root ("http://host:port"; a trailing "/v1" is accepted).
    `model=None` asks GET /v1/models once and uses the first model. `timeout` bounds
    connecting and each wait for the next chunk, not the whole generation.
    Sampling keyword arguments (max_tokens, temperature, top_p, top_k, stop, seed,
    ignore_eos, ...) are sent as request fields unchanged.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        *,
        return_token_ids: bool = True,
    ) -> None:
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.model = model
        # Asked for by default; switched off after the first request the server rejects
        # because of the field, so a gateway without it still streams (token_ids == []).
        self.return_token_ids = return_token_ids
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            # Many concurrent streams (the benchmark) must not queue on the pool.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._open: set[httpx.Response] = set()
        self._model_lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every open stream (the server aborts those requests), then the pool."""
        for response in list(self._open):
            await response.aclose()
        self._open.clear()
        await self._http.aclose()

    # ---- model -------------------------------------------------------------------

    async def models(self) -> list[str]:
        try:
            r = await self._http.get("/v1/models")
        except httpx.TransportError as e:
            raise APIConnectionError(f"GET {self.base_url}/v1/models: {e!r}") from e
        if r.status_code != 200:
            raise _error_from_body(r.status_code, r.content)
        return [m["id"] for m in r.json().get("data", [])]

    async def resolve_model(self) -> str:
        if self.model is None:
            if self._model_lock is None:
                self._model_lock = asyncio.Lock()
            async with self._model_lock:
                if self.model is None:
                    names = await self.models()
                    if not names:
                        raise APIError(404, "the server lists no models", "not_found_error")
                    self.model = names[0]
        return self.model

    # ---- streaming ---------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> Stream:
        """Stream a chat completion: chunks of the assistant's reply."""
        return Stream(self._stream("/v1/chat/completions", {"messages": messages}, sampling, chat=True))

    def generate(self, prompt: str | list[int], **sampling: Any) -> Stream:
        """Stream a text completion; `prompt` is text or a list of token ids."""
        return Stream(self._stream("/v1/completions", {"prompt": prompt}, sampling, chat=False))

    async def complete(self, prompt: str | list[int], **sampling: Any) -> str:
        """The whole completion text (choice 0)."""
        async with self.generate(prompt, **sampling) as stream:
            return "".join([c.text async for c in stream if c.index == 0])

    async def chat_complete(self, messages: list[dict[str, Any]], **sampling: Any) -> str:
        """The whole chat reply text (choice 0)."""
        async with self.chat(messages, **sampling) as stream:
            return "".join([c.text async for c in stream if c.index == 0])

    # ---- runtime extensions (README "Structured generation") --------------------

    async def score(self, prompt: str | list[int], continuations: list[str] | list[list[int]]) -> list[dict[str, Any]]:
        """POST /v1/score: per continuation, `token_ids`, `logprobs` (each token's, given
        everything before it), `logprob_sum` and `mean_logprob`. `post("/v1/score", ...)`
        returns the whole body (with usage)."""
        body = await self.post("/v1/score", {"model": await self.resolve_model(), "prompt": prompt,
                                             "continuations": continuations})
        return body["data"]

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body, return the JSON answer; APIError for an error answer."""
        try:
            r = await self._http.post(path, json=payload)
        except httpx.TransportError as e:
            raise APIConnectionError(f"POST {self.base_url}{path}: {e!r}") from e
        if r.status_code != 200:
            raise _error_from_body(r.status_code, r.content)
        return r.json()

    async def _stream(
        self, path: str, body: dict[str, Any], sampling: dict[str, Any], chat: bool
    ) -> AsyncIterator[Chunk]:
        payload = {"model": await self.resolve_model(), **body, **sampling, "stream": True}
        payload.setdefault("stream_options", {"include_usage": True})
        response = await self._open_stream(path, payload)
        self._open.add(response)
        try:
            async with contextlib.aclosing(_sse_events(response)) as events:
                async for data in events:
                    if data.strip() == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError as e:
                        raise APIError(502, f"malformed SSE event from the server: {data[:200]!r}") from e
                    if isinstance(event.get("error"), dict):
                        raise _error_from_object(None, event["error"])
                    for chunk in _chunks(event, chat):
                        yield chunk
        except httpx.TransportError as e:
            raise APIConnectionError(f"POST {self.base_url}{path}: stream broken: {e!r}") from e
        finally:
            # Runs on exhaustion, error, break + aclose, or asyncgen finalization:
            # closing mid-body drops the connection, which the server sees as a disconnect.
            self._open.discard(response)
            await response.aclose()

    async def _open_stream(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        ask_ids = self.return_token_ids and "return_token_ids" not in payload
        while True:
            request = {**payload, "return_token_ids": True} if ask_ids else payload
            try:
                response = await self._http.send(self._http.build_request("POST", path, json=request), stream=True)
            except httpx.TransportError as e:
                raise APIConnectionError(f"POST {self.base_url}{path}: {e!r}") from e
            if response.status_code == 200:
                return response
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            err = _error_from_body(response.status_code, body)
            if ask_ids and err.status in (400, 422) and "return_token_ids" in f"{err.param} {err.message}":
                self.return_token_ids = ask_ids = False
                continue
            raise err
