"""The gateway (HTTP app + ZMQ link) against a fake controller that answers with a real
EngineCore on the tiny model: texts equal to the offline Engine's, the official openai
client, streaming, n, stop strings (Abort sent), logprobs, cached tokens, errors as OpenAI
error objects, client disconnects (Abort sent), /health and /metrics."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import zmq
import zmq.asyncio
from transformers import AutoTokenizer

from runtime import Engine, SamplingParams
from runtime import ipc
from runtime.config import ClusterConfig, EngineConfig
from runtime.engine.core import EngineCore
from runtime.messages import Abort, ClusterStatus, Generate, RequestError, TokenDelta, params_from_dict
from runtime.tokenizer.app import build_app
from runtime.tokenizer.generation import Generation
from runtime.tokenizer.state import GatewayState

API_KEY = "sk-test"
MODEL = "tiny"
MAX_LEN = 1024
STATUS_TIMEOUT_S = 1.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was",
    "def add(a, b):",
    "Paris is the capital of",
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, how are you today?"}]


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker(role: str, alive: bool = True) -> dict[str, Any]:
    return dict(role=role, id=0, pid=4242, alive=alive, running=0, queued=0, served=0, kv_free_pages=90, kv_total_pages=100)


class FakeController:
    """The controller's side of the gateway link, in its own thread and event loop: Generate
    runs on a real EngineCore, each step's tokens go back as TokenDelta, a ClusterStatus
    goes out every 0.1 s. Knobs let a test inject errors, slow steps or scripted tokens."""

    def __init__(self, cfg: ClusterConfig, model_dir: str) -> None:
        self.cfg = cfg
        self.core = EngineCore(EngineConfig(model=model_dir, device="cpu", dtype="float32"))
        self.received: list[Generate | Abort] = []
        self.cached: dict[str, int] = {}  # rid -> cached_tokens the engine reported
        self.reset()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, name="fake-controller", daemon=True)

    def reset(self) -> None:
        self.workers = [worker("prefill"), worker("decode")]
        self.metrics: dict[str, Any] = dict(
            prefix_cache_hit_rate=0.25, kv_used_pages=30, kv_total_pages=120,
            kv_transfer_bytes_total=4096, kv_transfer_failures_total=1,
        )
        self.samples: dict[str, Any] | None = None  # sent in one ClusterStatus, then cleared
        self.send_status = True
        self.step_delay = 0.0
        self.fail_next: tuple[int, str] | None = None  # answer the next Generate with this error
        self.fail_after: int | None = None  # the next request fails after this many deltas
        self.scripts: list[list[int]] = []  # next Generates get these tokens, one per delta
        self.burst = False  # scripted deltas all sent at once (a gateway behind its workers)

    def start(self) -> None:
        self.thread.start()
        assert self._ready.wait(10), "fake controller did not start"

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self._error is not None:
            raise self._error

    def aborts(self) -> set[str]:
        return {m.rid for m in list(self.received) if isinstance(m, Abort)}

    def generates(self) -> list[Generate]:
        return [m for m in list(self.received) if isinstance(m, Generate)]

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # surfaced by stop()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        pull = ipc.pull(ctx, self.cfg.controller_addr, bind=True)
        push = ipc.push(ctx, self.cfg.gateway_addr)
        self._ready.set()
        scripted: dict[str, list[int]] = {}
        failing: dict[str, int] = {}
        next_status = 0.0
        try:
            while not self._stop.is_set():
                busy = self.core.has_work or bool(scripted)
                if await pull.sock.poll(timeout=1 if busy else 10):
                    while await pull.sock.poll(timeout=0):
                        await self._handle(await pull.recv(), push, scripted, failing)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + 0.1
                    if self.send_status:
                        await push.send(self._status())
                for rid in list(scripted):
                    ids = scripted[rid]
                    while ids:
                        tok = ids.pop(0)
                        done = "length" if not ids else None
                        await push.send(TokenDelta(rid, [tok], None, done, None, 3, 0, 0))
                        if not self.burst:
                            break
                    if not ids:
                        del scripted[rid]
                if self.core.has_work:
                    for out in self.core.step():
                        await self._delta(out, push, failing)
                    if self.step_delay:
                        await asyncio.sleep(self.step_delay)
        finally:
            pull.close()
            push.close()
            ctx.term()

    def _status(self) -> ClusterStatus:
        metrics = dict(self.metrics)
        if self.samples:
            metrics.update(self.samples)
            self.samples = None
        return ClusterStatus([dict(w) for w in self.workers], metrics)

    async def _handle(self, msg: Any, push: ipc.Queue, scripted: dict[str, list[int]], failing: dict[str, int]) -> None:
        self.received.append(msg)
        if isinstance(msg, Abort):
            self.core.abort(msg.rid)
            scripted.pop(msg.rid, None)
            return
        assert isinstance(msg, Generate), f"unexpected {type(msg).__name__}"
        if self.fail_next is not None:
            code, text = self.fail_next
            self.fail_next = None
            await push.send(RequestError(msg.rid, text, code))
            return
        if self.scripts:
            scripted[msg.rid] = list(self.scripts.pop(0))
            return
        try:
            self.core.add_request(msg.rid, msg.prompt_ids, params_from_dict(msg.params))
        except ValueError as e:
            await push.send(RequestError(msg.rid, str(e), 400))
            return
        if self.fail_after is not None:
            failing[msg.rid] = self.fail_after
            self.fail_after = None

    async def _delta(self, out: Any, push: ipc.Queue, failing: dict[str, int]) -> None:
        req = out.req
        self.cached[req.rid] = req.cached_tokens
        if req.rid in failing:
            failing[req.rid] -= 1
            if failing[req.rid] < 0:
                del failing[req.rid]
                self.core.abort(req.rid)
                await push.send(RequestError(req.rid, "the decode worker serving this request died", 503))
                return
        lps = None
        if req.params.logprobs is not None:
            lps = [[lp.logprob, [[i, v] for i, v in lp.top]] for lp in out.new_logprobs]
        await push.send(TokenDelta(
            req.rid, out.new_token_ids, lps, req.finish_reason if out.finished else None, req.stop_reason,
            len(req.prompt_ids), req.cached_tokens, len(req.output_ids),
        ))


class ServerThread:
    """uvicorn (uvloop) serving the app on a free loopback port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="gateway", daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 20, "uvicorn to start")
        assert self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.sock.close()


class Gateway:
    def __init__(self, url: str, state: GatewayState, fake: FakeController) -> None:
        self.url = url
        self.state = state
        self.fake = fake
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=60)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def complete(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": MODEL, **body})

    def chat(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": MODEL, **body})

    def sse(self, path: str, body: dict[str, Any]) -> list[Any]:
        """The data of every SSE event, parsed ([DONE] kept as the string)."""
        events = []
        with self.http.stream("POST", path, json={"model": MODEL, **body}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))
        return events


@pytest.fixture(scope="module")
def gw(tiny_model_dir: str) -> Iterator[Gateway]:
    ipc_dir = tempfile.mkdtemp(prefix="rt-gw-")
    cfg = ClusterConfig(ipc_dir=ipc_dir, api_key=API_KEY)
    fake = FakeController(cfg, tiny_model_dir)
    fake.start()
    server = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        state = GatewayState(cfg, tokenizer, MODEL, MAX_LEN, vocab_size=512, status_timeout_s=STATUS_TIMEOUT_S)
        server = ServerThread(build_app(state))
        server.start()
        g = Gateway(f"http://127.0.0.1:{server.port}", state, fake)
        wait_for(lambda: g.http.get("/health").status_code == 200, 10, "/health 200")
        yield g
        g.http.close()
        g.client.close()
    finally:
        if server is not None:
            server.stop()
        fake.stop()
        shutil.rmtree(ipc_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_fake(gw: Gateway) -> Iterator[None]:
    gw.fake.reset()
    yield
    gw.fake.reset()
    # Whatever a test did, no request may be left behind in the gateway or the engine.
    wait_for(lambda: not gw.state.routes and not gw.fake.core.requests, 5, "requests to drain")
    running = lambda: _metric(gw.http.get("/metrics").text, "runtime_requests_running")  # noqa: E731
    wait_for(lambda: running() == 0, 5, f"runtime_requests_running to return to 0 (is {running()})")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Iterator[Engine]:
    e = Engine(tiny_model_dir, device="cpu", dtype="float32")
    yield e
    e.shutdown()


def greedy(max_tokens: int = 16, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- outputs ---------------------------------------------------------------------------------
def test_models(gw: Gateway) -> None:
    r = gw.http.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert [m.id for m in gw.client.models.list().data] == [MODEL]


def test_completions_match_engine(gw: Gateway, engine: Engine) -> None:
    want = engine.generate(PROMPTS, greedy(16))
    for prompt, res in zip(PROMPTS, want):
        r = gw.complete(prompt=prompt, max_tokens=16, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == MODEL
        (choice,) = body["choices"]
        assert choice["text"] == res.text
        assert choice["finish_reason"] == res.finish_reason
        assert body["usage"]["prompt_tokens"] == res.prompt_tokens
        assert body["usage"]["completion_tokens"] == len(res.token_ids)
        assert body["usage"]["total_tokens"] == res.prompt_tokens + len(res.token_ids)
    # A batch of prompts (and token-id prompts) in one request: one choice per prompt, in order.
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    for prompt in (PROMPTS, ids):
        r = gw.complete(prompt=prompt, max_tokens=16, temperature=0)
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [w.text for w in want[: len(prompt)]]


def test_chat_matches_engine(gw: Gateway, engine: Engine) -> None:
    (want,) = engine.chat([CHAT], greedy(20))
    r = gw.chat(messages=CHAT, max_completion_tokens=20, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want.text}
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    # Text parts are accepted as content too.
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CHAT]
    r = gw.chat(messages=parts, max_tokens=20, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == want.text


def test_openai_client_streaming(gw: Gateway) -> None:
    c = gw.client
    full = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(c.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    full = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


async def test_runtime_async_client(gw: Gateway, engine: Engine) -> None:
    """The project's AsyncClient (INTERFACE.md) streams text and token ids from the gateway."""
    from runtime.client import AsyncClient

    (want,) = engine.generate(PROMPTS[3], greedy(16))
    (chat_want,) = engine.chat([CHAT], greedy(12))
    async with AsyncClient(gw.url, api_key=API_KEY) as client:
        chunks = [c async for c in client.generate(PROMPTS[3], max_tokens=16, temperature=0)]
        assert "".join(c.text for c in chunks) == want.text
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert chunks[-1].usage["completion_tokens"] == len(want.token_ids)
        assert [c.finish_reason for c in chunks if c.finish_reason] == [want.finish_reason]
        assert await client.chat_complete(CHAT, max_tokens=12, temperature=0) == chat_want.text


def test_return_token_ids(gw: Gateway, engine: Engine) -> None:
    (want,) = engine.generate(PROMPTS[0], greedy(10))
    body = gw.complete(prompt=PROMPTS[0], max_tokens=10, temperature=0, return_token_ids=True).json()
    assert body["choices"][0]["token_ids"] == want.token_ids
    assert "token_ids" not in gw.complete(prompt=PROMPTS[0], max_tokens=2).json()["choices"][0]
    (chat_want,) = engine.chat([CHAT], greedy(10))
    body = gw.chat(messages=CHAT, max_tokens=10, temperature=0, return_token_ids=True).json()
    assert body["choices"][0]["token_ids"] == chat_want.token_ids


def test_n_choices(gw: Gateway, engine: Engine) -> None:
    want = engine.generate(PROMPTS[0], SamplingParams(n=2, seed=123, temperature=1.0, max_tokens=12))
    res = gw.client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, seed=123, temperature=1.0, max_tokens=12)
    choices = sorted(res.choices, key=lambda ch: ch.index)
    assert [ch.index for ch in choices] == [0, 1]
    assert [ch.text for ch in choices] == [w.text for w in want]
    assert choices[0].text != choices[1].text  # seed + i: the samples differ
    assert res.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert res.usage.prompt_tokens == want[0].prompt_tokens  # counted once per prompt
    # Streamed, choices interleave; each one's text is the same.
    texts = ["", ""]
    for ch in gw.client.completions.create(
        model=MODEL, prompt=PROMPTS[0], n=2, seed=123, temperature=1.0, max_tokens=12, stream=True
    ):
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == [w.text for w in want]
    chat = gw.client.chat.completions.create(model=MODEL, messages=CHAT, n=2, seed=7, temperature=1.0, max_tokens=8)
    assert sorted(ch.index for ch in chat.choices) == [0, 1]


async def test_concurrent_requests(gw: Gateway, engine: Engine) -> None:
    prompts = PROMPTS * 2
    want = engine.generate(prompts, greedy(12))
    async with httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=60) as client:
        rs = await asyncio.gather(*(
            client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0}) for p in prompts
        ))
    assert [r.json()["choices"][0]["text"] for r in rs] == [w.text for w in want]


def test_default_max_tokens(gw: Gateway) -> None:
    """Completions without max_tokens: 16, as OpenAI's (within the context); max_tokens null
    and chat completions without it: the rest of the context."""
    def usage(r: httpx.Response) -> int:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        return r.json()["usage"]["completion_tokens"]

    assert usage(gw.complete(prompt=[5, 6, 7], temperature=0, ignore_eos=True)) == 16
    ids = [(7 * i) % 500 + 3 for i in range(MAX_LEN - 10)]
    assert usage(gw.complete(prompt=ids, temperature=0, ignore_eos=True)) == 10
    assert usage(gw.complete(prompt=ids[:MAX_LEN - 20], temperature=0, ignore_eos=True, max_tokens=None)) == 20
    chat = gw.chat(messages=[{"role": "user", "content": "hi"}], temperature=0, ignore_eos=True)
    assert usage(chat) == MAX_LEN - chat.json()["usage"]["prompt_tokens"]


def test_stop_string_ends_text_and_aborts(gw: Gateway, engine: Engine) -> None:
    (full,) = engine.generate(PROMPTS[1], greedy(48, ignore_eos=True))
    assert len(full.text) > 30
    stop = full.text[12:16]
    expected = full.text[: full.text.find(stop)]
    (ref,) = engine.generate(PROMPTS[1], greedy(48, ignore_eos=True, stop=[stop]))
    assert ref.text == expected
    r = gw.complete(prompt=PROMPTS[1], max_tokens=48, temperature=0, ignore_eos=True, stop=stop)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert body["usage"]["completion_tokens"] < 48
    wait_for(lambda: body["id"] + "-0" in gw.fake.aborts(), 5, "Abort of the stopped request")
    # Streamed: the same text, never past the stop string.
    events = gw.sse("/v1/completions", dict(prompt=PROMPTS[1], max_tokens=48, temperature=0, ignore_eos=True, stop=[stop, "\x00"], stream=True))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    wait_for(lambda: events[0]["id"] + "-0" in gw.fake.aborts(), 5, "Abort of the stopped stream")


def test_multibyte_characters_are_never_split(gw: Gateway) -> None:
    text = "héllo 世界 🙂 ok"
    ids = gw.state.tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # the tiny BPE spells these characters byte by byte
    gw.fake.scripts.append(ids)
    events = gw.sse("/v1/completions", dict(prompt="hi", max_tokens=len(ids), stream=True))
    pieces = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    gw.fake.scripts.append(ids)
    assert gw.complete(prompt="hi", max_tokens=len(ids)).json()["choices"][0]["text"] == text


def test_stream_sends_what_is_already_received_as_one_chunk_per_choice(gw: Gateway) -> None:
    """Deltas that reached the gateway before the stream wrote the last chunk (the gateway
    behind its workers) go out as one chunk per choice, not one per token: same text, same
    tokens in order, one finish; a choice's stream is unchanged otherwise."""
    text = "héllo 世界, the quick brown fox 🙂"
    ids = gw.state.tokenizer(text)["input_ids"]
    gw.fake.burst = True
    try:
        gw.fake.scripts += [ids, ids]
        events = gw.sse("/v1/completions", dict(prompt="hi", max_tokens=len(ids), n=2, stream=True,
                                                 return_token_ids=True))
    finally:
        gw.fake.burst = False
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert "".join(c["text"] for c in mine) == text
        assert [t for c in mine for t in c["token_ids"]] == ids
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert len(chunks) < 2 * len(ids), "every token went out as a chunk of its own"


def test_cached_tokens_reach_usage(gw: Gateway) -> None:
    prompt = " ".join(PROMPTS) * 3
    gw.complete(prompt=prompt, max_tokens=2, temperature=0)
    r = gw.complete(prompt=prompt, max_tokens=2, temperature=0)
    body = r.json()
    reported = gw.fake.cached[body["id"] + "-0"]
    assert reported > 0
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == reported
    res = gw.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert res.usage.prompt_tokens_details.cached_tokens == gw.fake.cached[res.id + "-0"] > 0


def test_logprobs(gw: Gateway, engine: Engine) -> None:
    (want,) = engine.generate(PROMPTS[2], greedy(8, logprobs=3))
    r = gw.complete(prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3)
    lp = r.json()["choices"][0]["logprobs"]
    n = len(want.token_ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"] == pytest.approx([w.logprob for w in want.logprobs], abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for top, w in zip(lp["top_logprobs"], want.logprobs):
        assert 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(w.top[0][1], abs=1e-4)

    res = gw.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    (ref,) = engine.chat([CHAT], greedy(8, logprobs=2))
    content = res.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    assert [c.logprob for c in content] == pytest.approx([w.logprob for w in ref.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.bytes for c in content)
    joined = b"".join(bytes(c.bytes) for c in content if c.token != "<|im_end|>")
    assert joined.decode("utf-8", errors="replace") == res.choices[0].message.content
    # Streamed chat logprobs: one entry per token, across chunks.
    chunks = list(gw.client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
    ))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-6)


# ---- errors ----------------------------------------------------------------------------------
def test_bad_requests_are_openai_errors(gw: Gateway) -> None:
    assert_error(gw.complete(prompt="hi", max_tokens=-1), 400, "max_tokens")
    assert_error(gw.complete(prompt="hi", max_tokens=4, temperature=-0.5), 400, "temperature")
    assert_error(gw.complete(prompt="hi", max_tokens=4, top_p=0), 400, "top_p")
    assert_error(gw.complete(prompt="hi", max_tokens="many"), 400, "max_tokens")
    assert_error(gw.complete(prompt="hi", max_tokens=4, seed=2**70), 400, "seed")
    r = gw.http.post("/v1/completions", content=b'{"prompt": "hi", "temperature": NaN}', headers={"content-type": "application/json"})
    assert_error(r, 400, "temperature")
    assert_error(gw.complete(max_tokens=4), 400, "prompt")
    assert_error(gw.complete(prompt="", max_tokens=4), 400, "prompt")
    assert_error(gw.complete(prompt=[1, 99999], max_tokens=4), 400, "prompt")
    assert_error(gw.chat(messages=[], max_tokens=4), 400, "messages")
    assert_error(gw.chat(messages=CHAT, top_logprobs=2), 400, "top_logprobs")
    assert_error(gw.chat(messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=50), 400, "top_logprobs")
    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(gw.chat(messages=img, max_tokens=4), 400, "messages")
    assert_error(gw.chat(messages=[{"role": "user", "content": [{"type": "text"}]}], max_tokens=4), 400, "messages")
    assert_error(gw.complete(prompt="hi", max_tokens=4, stream_options={"include_usage": True}), 400, "stream_options")
    err = assert_error(gw.complete(prompt="hi", model="gpt-9"), 404, "model")
    assert "gpt-9" in err["message"]
    # Prompt longer than the context, or prompt + max_tokens over it.
    err = assert_error(gw.complete(prompt=[5] * MAX_LEN, max_tokens=1), 400, "prompt")
    assert "context length" in err["message"]
    err = assert_error(gw.complete(prompt=[5] * (MAX_LEN - 10), max_tokens=11), 400, "max_tokens")
    assert "context length" in err["message"]
    long_chat = [{"role": "user", "content": "hello " * MAX_LEN}]
    assert_error(gw.chat(messages=long_chat, max_tokens=4), 400, "messages")
    # Malformed JSON and a non-object body.
    for content in (b'{"prompt": "hi", ', b"[1, 2]", b""):
        r = gw.http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert_error(r, 400)
    assert_error(gw.http.get("/v1/nothing-here"), 404)
    # The official client raises its typed errors.
    with pytest.raises(openai.BadRequestError):
        gw.client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        gw.client.chat.completions.create(model="nope", messages=CHAT, max_tokens=3)
    # Still serving.
    assert gw.complete(prompt="hi", max_tokens=3).status_code == 200


def test_api_key(gw: Gateway) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert_error(r, 401)
    assert_error(httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    bad = openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    bad.close()
    # /health and /metrics stay open (load balancers and scrapers carry no key).
    assert httpx.get(gw.url + "/health").status_code == 200
    assert httpx.get(gw.url + "/metrics").status_code == 200
    assert gw.complete(prompt="hi", max_tokens=2).status_code == 200


def test_controller_errors(gw: Gateway) -> None:
    gw.fake.fail_next = (503, "no live decode worker; try again shortly")
    err = assert_error(gw.complete(prompt="hi", max_tokens=4), 503)
    assert "no live decode worker" in err["message"]
    # Streaming, before any token: still a plain HTTP error.
    gw.fake.fail_next = (503, "no live prefill worker")
    r = gw.http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True})
    assert_error(r, 503)
    # Streaming, after tokens were sent: an error event, then [DONE].
    gw.fake.fail_after = 3
    events = gw.sse("/v1/completions", dict(prompt="hi", max_tokens=40, ignore_eos=True, temperature=0, stream=True))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 503 and "died" in events[-2]["error"]["message"]
    assert sum(1 for e in events[:-2] if e["choices"][0]["text"]) >= 1
    # A non-stream request whose worker dies mid-way: the HTTP status of the error.
    gw.fake.fail_after = 2
    assert_error(gw.complete(prompt="hi", max_tokens=40, ignore_eos=True), 503)
    assert gw.complete(prompt="hi", max_tokens=3).status_code == 200


def test_stream_disconnect_aborts(gw: Gateway) -> None:
    gw.fake.step_delay = 0.01
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
    rid = json.loads(first[len("data: "):])["id"] + "-0"
    wait_for(lambda: rid in gw.fake.aborts(), 5, "Abort after the client disconnected")
    wait_for(lambda: rid not in gw.state.routes and rid not in gw.fake.core.requests, 5, "the request to be dropped")


def test_nonstream_disconnect_aborts(gw: Gateway) -> None:
    gw.fake.step_delay = 0.01
    before = {g.rid for g in gw.fake.generates()}
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 600, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)
        new = wait_for(lambda: {g.rid for g in gw.fake.generates()} - before, 5, "the Generate")
    (rid,) = new
    wait_for(lambda: rid in gw.fake.aborts(), 5, "Abort after the client disconnected")
    wait_for(lambda: rid not in gw.state.routes and rid not in gw.fake.core.requests, 5, "the request to be dropped")


def test_unknown_rid_is_ignored(gw: Gateway) -> None:
    # Deltas for a request the gateway already forgot (aborted) must not disturb anything.
    async def send() -> None:
        ctx = zmq.asyncio.Context()
        q = ipc.push(ctx, gw.state.cfg.gateway_addr)
        await q.send(TokenDelta("nobody-0", [5], None, None, None, 1, 0, 1))
        await q.send(RequestError("nobody-1", "x", 500))
        await asyncio.sleep(0.1)
        q.close()
        ctx.term()

    asyncio.run(send())
    assert gw.complete(prompt="hi", max_tokens=3).status_code == 200


async def test_shutdown_aborts_requests_in_flight(tiny_model_dir: str) -> None:
    ipc_dir = tempfile.mkdtemp(prefix="rt-gw-")
    cfg = ClusterConfig(ipc_dir=ipc_dir)
    ctx = zmq.asyncio.Context()
    controller = ipc.pull(ctx, cfg.controller_addr, bind=True)
    state = GatewayState(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), MODEL, MAX_LEN)
    try:
        await state.start()
        gen = Generation(state, "req", [([5, 6, 7], SamplingParams(max_tokens=4, n=2))])
        await gen.start()
        got = [await controller.recv_timeout(5) for _ in range(2)]
        assert sorted(g.rid for g in got) == ["req-0", "req-1"] and all(g.prompt_ids == [5, 6, 7] for g in got)
        await state.stop()
        aborts = [await controller.recv_timeout(5) for _ in range(2)]
        assert sorted(aborts, key=lambda a: a.rid) == [Abort("req-0"), Abort("req-1")]
        assert not state.routes
    finally:
        await state.stop()
        controller.close()
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)


# ---- health and metrics ----------------------------------------------------------------------
def test_health(gw: Gateway) -> None:
    r = gw.http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert sorted(w["role"] for w in body["workers"]) == ["decode", "prefill"]
    keys = {"role", "id", "pid", "alive", "running", "queued", "served", "kv_free_pages", "kv_total_pages"}
    assert all(keys <= set(w) for w in body["workers"])
    # A role with no live worker.
    gw.fake.workers = [worker("prefill"), worker("decode", alive=False)]
    r = wait_for(lambda: (x := gw.http.get("/health")).status_code == 503 and x, 3, "/health 503")
    assert r.json()["status"] == "unavailable" and len(r.json()["workers"]) == 2
    gw.fake.workers = [worker("prefill"), worker("decode")]
    wait_for(lambda: gw.http.get("/health").status_code == 200, 3, "/health 200 again")
    # The controller goes silent: /health says so, and requests get 503 instead of hanging.
    gw.fake.send_status = False
    r = wait_for(lambda: (x := gw.http.get("/health")).status_code == 503 and x, STATUS_TIMEOUT_S + 2, "/health 503")
    assert r.json()["status"] == "unavailable"
    assert_error(gw.complete(prompt="hi", max_tokens=3), 503)
    gw.fake.send_status = True
    wait_for(lambda: gw.http.get("/health").status_code == 200, 3, "/health 200 again")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics(gw: Gateway) -> None:
    before = gw.http.get("/metrics").text
    ttft_before = _metric(before, "runtime_time_to_first_token_seconds_count")
    lat_before = _metric(before, "runtime_kv_transfer_latency_seconds_count")
    wait_before = _metric(before, "runtime_kv_wait_seconds_count")
    assert gw.complete(prompt="hi", max_tokens=4, temperature=0).status_code == 200
    gw.fake.samples = {"kv_transfer_latency_seconds": [0.002, 0.004], "kv_wait_seconds": [0.03],
                       "spec_accept_length": {"ngram": [1, 3, 2]}}
    wait_for(lambda: gw.fake.samples is None, 3, "the samples to be sent")
    time.sleep(0.35)  # several more statuses (without samples) arrive
    r = gw.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, "runtime_time_to_first_token_seconds_count") >= ttft_before + 1
    assert _metric(text, "runtime_e2e_request_latency_seconds_count") >= 1
    assert "runtime_inter_token_latency_seconds_bucket" in text
    assert _metric(text, "runtime_kv_transfer_latency_seconds_count") == lat_before + 2  # each sample once
    assert _metric(text, "runtime_kv_wait_seconds_count") == wait_before + 1
    assert _metric(text, "runtime_kv_wait_seconds_sum") == pytest.approx(0.03)
    assert 'runtime_spec_accept_length_count{drafter="ngram"} 3.0' in text
    assert 'runtime_spec_accept_length_sum{drafter="ngram"} 6.0' in text
    assert _metric(text, "runtime_prefix_cache_hit_rate") == 0.25
    assert _metric(text, "runtime_kv_usage_ratio") == pytest.approx(0.25)
    assert _metric(text, "runtime_kv_transfer_bytes_total") == 4096
    assert _metric(text, "runtime_kv_transfer_failures_total") == 1
