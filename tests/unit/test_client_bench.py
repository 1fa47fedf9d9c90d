"""AsyncClient and `runtime bench` against a tiny fake OpenAI-compatible server.

The fake (FastAPI + uvicorn on a free loopback port, in a background thread) streams
fixed chunks, answers errors as OpenAI error objects, counts cached prompt tokens as
the longest word prefix shared with an earlier prompt, and records when a stream is
abandoned by its client, so the tests can check what a user would notice: text,
errors, that breaking out of a stream aborts it on the server, and benchmark numbers.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from runtime import bench  # noqa: E402
from runtime.client import APIConnectionError, APIError, AsyncClient  # noqa: E402
from runtime.common.continuations import common_prefix  # noqa: E402

API_KEY = "sk-test"
MODEL = "fake-model"


class FakeState:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.seen: list[list[str]] = []  # earlier prompts, as words: the fake "prefix cache"
        self.aborted = threading.Event()  # a "long" stream ended before its last chunk
        self.finished_long = threading.Event()


def _err(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": None}}, status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    def check(request: Request, body: dict[str, Any]) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return _err(401, "invalid API key", "authentication_error")
        if body.get("model") == "strict" and "return_token_ids" in body:
            return _err(400, "unknown field: return_token_ids", "invalid_request_error", "return_token_ids")
        if body.get("model") not in (MODEL, "strict"):
            return _err(404, f"model {body.get('model')!r} not found", "not_found_error", "model")
        return None

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}, {"id": "other", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        state.bodies.append(body)
        if (bad := check(request, body)) is not None:
            return bad
        prompt = body["prompt"]
        if prompt == "bad":
            return _err(400, "prompt is too long for the context", "invalid_request_error", "prompt")
        words = [str(t) for t in prompt] if isinstance(prompt, list) else prompt.split()
        cached = max((common_prefix(words, s) for s in state.seen), default=0)
        state.seen.append(words)
        with_ids = bool(body.get("return_token_ids"))
        usage_on = bool((body.get("stream_options") or {}).get("include_usage"))
        n = int(body.get("max_tokens") or 16)

        def chunk(i: int, text: str, finish: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
            if with_ids:
                c["token_ids"] = [100 + i]
            return {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [c]}

        async def stream() -> Any:
            if prompt == "long":
                try:
                    for i in range(500):  # 10 s unless the client goes away
                        yield _sse(chunk(i, f" t{i}"))
                        await asyncio.sleep(0.02)
                    state.finished_long.set()
                finally:
                    if not state.finished_long.is_set():
                        state.aborted.set()
                return
            if prompt == "midstream-error":
                yield _sse(chunk(0, " partial"))
                yield _sse({"error": {"message": "KV transfer failed", "type": "server_error", "code": 503}})
                return
            for i in range(n):
                await asyncio.sleep(0.002)
                yield _sse(chunk(i, f" t{i}", "length" if i == n - 1 else None))
            if usage_on:
                yield _sse({"id": "cmpl-1", "choices": [], "usage": {
                    "prompt_tokens": len(words), "completion_tokens": n, "total_tokens": len(words) + n,
                    "prompt_tokens_details": {"cached_tokens": cached}}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        state.bodies.append(body)
        if (bad := check(request, body)) is not None:
            return bad

        async def stream() -> Any:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            yield ": keep-alive comment\n\n"
            for piece in ("Hello", ", ", "world"):
                yield _sse({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture
def server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(state), log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "fake server did not stop"


# ---- client ------------------------------------------------------------------------


async def test_chat_streams_text_and_usage(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url + "/v1/", api_key=API_KEY) as client:
        chunks = [c async for c in client.chat([{"role": "user", "content": "hi"}], max_tokens=8)]
        assert "".join(c.text for c in chunks) == "Hello, world"
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
        assert chunks[-1].usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        assert await client.chat_complete([{"role": "user", "content": "hi"}]) == "Hello, world"
    # the model came from GET /v1/models (first entry); sampling fields pass through
    assert state.bodies[0]["model"] == MODEL and state.bodies[0]["max_tokens"] == 8
    assert state.bodies[0]["stream"] is True and state.bodies[0]["messages"][0]["content"] == "hi"


async def test_generate_and_complete(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url, api_key=API_KEY, model=MODEL) as client:
        stream = client.generate("Once upon a time", max_tokens=4, temperature=0)
        chunks = [c async for c in stream]
        assert "".join(c.text for c in chunks) == " t0 t1 t2 t3"
        assert [i for c in chunks for i in c.token_ids] == [100, 101, 102, 103]
        assert chunks[-1].finish_reason == "length" or chunks[-2].finish_reason == "length"
        assert stream.usage is not None and stream.usage["completion_tokens"] == 4
        assert chunks[-1].cached_tokens == 0
        assert await client.complete("Once upon a time", max_tokens=3) == " t0 t1 t2"
    assert state.bodies[0]["temperature"] == 0 and state.bodies[0]["return_token_ids"] is True


async def test_token_ids_fall_back_when_server_rejects_the_field(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url, api_key=API_KEY, model="strict") as client:
        chunks = [c async for c in client.generate([5, 6, 7], max_tokens=2)]
        assert "".join(c.text for c in chunks) == " t0 t1"
        assert all(c.token_ids == [] for c in chunks)
        assert client.return_token_ids is False
        await client.complete("again", max_tokens=1)
    assert "return_token_ids" not in state.bodies[-1]  # not asked again


async def test_error_object_maps_to_api_error(server: tuple[str, FakeState]) -> None:
    url, _ = server
    async with AsyncClient(url, api_key=API_KEY) as client:
        with pytest.raises(APIError) as e:
            await client.complete("bad", max_tokens=4)
        assert e.value.status == 400 and e.value.message == "prompt is too long for the context"
        assert e.value.type == "invalid_request_error" and e.value.param == "prompt"
        with pytest.raises(APIError) as e:
            await client.complete("x", model="nope")
        assert e.value.status == 404 and "nope" in e.value.message
        # an error event after streaming began: the text so far, then APIError
        got: list[str] = []
        with pytest.raises(APIError) as e:
            async for c in client.generate("midstream-error", max_tokens=4):
                got.append(c.text)
        assert got == [" partial"] and e.value.status == 503 and e.value.message == "KV transfer failed"
    async with AsyncClient(url, api_key="wrong", model=MODEL) as client:
        with pytest.raises(APIError) as e:
            await client.complete("hi")
        assert e.value.status == 401 and e.value.type == "authentication_error"


async def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncClient(f"http://127.0.0.1:{port}", model=MODEL, timeout=5) as client:
        with pytest.raises(APIConnectionError):
            await client.complete("hi")


async def _wait(event: threading.Event, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return event.is_set()


async def test_break_mid_stream_aborts_on_server(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url, api_key=API_KEY, model=MODEL) as client:
        n = 0
        async for _ in client.generate("long"):  # bare loop: closed by the asyncgen finalizer
            n += 1
            if n == 3:
                break
        assert await _wait(state.aborted, 1.0), "server did not see the disconnect within 1 s"
        assert not state.finished_long.is_set()
        assert await client.complete("still usable", max_tokens=2) == " t0 t1"


async def test_stream_context_and_client_exit_close_the_stream(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url, api_key=API_KEY, model=MODEL) as client:
        async with client.generate("long") as stream:
            async for _ in stream:
                break
        assert await _wait(state.aborted, 1.0)
    state.aborted.clear()
    client = AsyncClient(url, api_key=API_KEY, model=MODEL)
    stream = client.generate("long")
    await stream.__anext__()  # held open by a variable: only the client's exit can close it
    await client.aclose()
    assert await _wait(state.aborted, 1.0)


async def test_cancelled_task_closes_its_stream(server: tuple[str, FakeState]) -> None:
    url, state = server
    async with AsyncClient(url, api_key=API_KEY, model=MODEL) as client:

        async def consume() -> None:
            async with client.generate("long") as stream:
                async for _ in stream:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _wait(state.aborted, 1.0)


# ---- bench -------------------------------------------------------------------------


def _bench(url: str, tmp_path: Path, dataset: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{dataset}.json"
    rc = bench.main([
        "--url", url, "--api-key", API_KEY, "--dataset", dataset, "--num-prompts", "12",
        "--concurrency", "4", "--input-len", "40", "--output-len", "6", "--seed", "1",
        "--out", str(out), *extra,
    ])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_writes_sane_json(server: tuple[str, FakeState], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    url, state = server
    res = _bench(url, tmp_path, "random")
    s = res["summary"]
    assert s["num_prompts"] == s["completed"] == 12 and s["failed"] == 0 and s["errors"] == {}
    assert s["total_output_tokens"] == 12 * 6 and s["total_input_tokens"] == 12 * 40
    assert s["duration_s"] > 0 and s["request_throughput"] > 0
    assert s["total_token_throughput"] > s["output_token_throughput"] > 0
    for name in ("ttft", "itl", "tpot", "e2e"):
        assert 0 < s[f"mean_{name}_ms"] and 0 < s[f"p50_{name}_ms"] <= s[f"p99_{name}_ms"]
    assert s["p99_ttft_ms"] < s["p99_e2e_ms"] < 10_000
    assert s["cache_hit_ratio"] < 0.1  # independent random prompts share almost nothing
    assert res["config"]["model"] == MODEL and res["baseline"]["ttft_ms"] > 0
    assert len(res["requests"]) == 12 and all(r["error"] is None for r in res["requests"])
    assert all(len(r["itl_s"]) == 5 for r in res["requests"])  # 6 chunks, 5 gaps
    # the timed requests: greedy, ignore_eos, exact max_tokens, streaming with usage
    timed = state.bodies[-12:]
    assert all(b["temperature"] == 0 and b["ignore_eos"] is True and b["max_tokens"] == 6 for b in timed)
    assert all(b["stream"] and b["stream_options"]["include_usage"] for b in timed)
    table = capsys.readouterr().out
    assert "TTFT" in table and "TPOT" in table and "request throughput" in table


def test_bench_datasets_shape_the_cache_hits(server: tuple[str, FakeState], tmp_path: Path) -> None:
    url, state = server
    shared = _bench(url, tmp_path, "shared-prefix", "--num-groups", "2", "--warmup", "0")["summary"]
    # 2 groups of 6, 80% shared: every request but each group's first hits 32 of 40 words
    assert shared["completed"] == 12
    assert shared["total_cached_tokens"] >= 10 * 32
    assert shared["cache_hit_ratio"] == pytest.approx(10 * 32 / (12 * 40), abs=0.03)
    prompts = [b["prompt"] for b in state.bodies[-12:]]
    assert len(set(prompts)) == 12 and len({p.split()[:32].__str__() for p in prompts}) == 2
    rep = _bench(url, tmp_path, "repeat", "--warmup", "0")["summary"]
    assert rep["cache_hit_ratio"] > 0.9
    assert len({b["prompt"] for b in state.bodies[-12:]}) == 1


def test_bench_counts_failures(server: tuple[str, FakeState], tmp_path: Path) -> None:
    url, _ = server
    out = tmp_path / "fail.json"
    rc = bench.main(["--url", url, "--api-key", "wrong", "--model", MODEL, "--num-prompts", "3",
                     "--warmup", "0", "--input-len", "4", "--output-len", "2", "--out", str(out)])
    assert rc == 1
    s = json.loads(out.read_text())["summary"]
    assert s["completed"] == 0 and s["failed"] == 3
    assert any("invalid API key" in e for e in s["errors"])


def test_make_prompts_lengths() -> None:
    r = bench.make_prompts("random", 5, 50, seed=3)
    assert len(r) == 5 and all(len(p.prompt.split()) == 50 for p in r)  # type: ignore[union-attr]
    assert r[0].prompt == bench.make_prompts("random", 5, 50, seed=3)[0].prompt  # seeded
    sp = bench.make_prompts("shared-prefix", 10, 20, seed=0, num_groups=3, prefix_ratio=0.5)
    assert len(sp) == 10 and all(len(p.prompt.split()) == 20 for p in sp)  # type: ignore[union-attr]
    assert len({" ".join(p.prompt.split()[:10]) for p in sp}) == 3  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown dataset"):
        bench.make_prompts("sharegpt", 1, 1)


def test_make_prompts_with_tokenizer_has_exact_lengths(tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sp = bench.make_prompts("shared-prefix", 6, 33, seed=0, num_groups=2, prefix_ratio=0.5, tokenizer=tok)
    assert all(isinstance(p.prompt, list) and len(p.prompt) == 33 for p in sp)
    assert len({tuple(p.prompt[:16]) for p in sp}) == 2 and len({tuple(p.prompt) for p in sp}) == 6  # type: ignore[index]
    assert all(0 <= i < tok.vocab_size for p in sp for i in p.prompt)  # type: ignore[union-attr]
