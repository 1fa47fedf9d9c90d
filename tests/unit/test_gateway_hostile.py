"""The gateway under hostile input, against the fake controller of test_gateway.py: invalid
Unicode and wrong types anywhere in the body are 400s with OpenAI error objects (never a
500), the per-request caps, a 2 MB prompt tokenised without stalling /health, 429 beyond
the queue bound, and a keep-alive client that keeps working after errors, a 500 included."""
from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

import runtime.tokenizer.serving as serving_mod
from runtime.tokenizer.prompts import INLINE_CHARS
from tests.unit.test_gateway import (  # noqa: F401 (gw and _fresh_fake are fixtures)
    AUTH,
    CHAT,
    MODEL,
    Gateway,
    _fresh_fake,
    _metric,
    assert_error,
    gw,
    wait_for,
    worker,
)

COMPLETIONS, CHAT_PATH = "/v1/completions", "/v1/chat/completions"
JSON_CT = {"content-type": "application/json"}


@pytest.fixture(autouse=True)
def _nothing_admitted(gw: Gateway) -> Iterator[None]:
    yield
    # Every request, refused or not, gives its room in the queues back.
    wait_for(lambda: gw.state.admitted == 0, 5, f"admitted sequences to return to 0 (are {gw.state.admitted})")


@contextmanager
def limits(gw: Gateway, **kw: Any) -> Iterator[None]:
    """The gateway's ClusterConfig with these fields changed, for one block."""
    cfg = gw.state.cfg
    gw.state.cfg = dataclasses.replace(cfg, **kw)
    try:
        yield
    finally:
        gw.state.cfg = cfg


def post_raw(gw: Gateway, path: str, body: str | bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return gw.http.post(path, content=body, headers=JSON_CT if headers is None else headers)


def no_500(r: httpx.Response) -> None:
    assert r.status_code != 500, r.text
    if r.status_code >= 400:
        assert_error(r, r.status_code)
    else:
        assert '"code":500' not in r.text and '"code": 500' not in r.text, r.text


# ---- invalid Unicode ---------------------------------------------------------------------------
OK_CHAT = '{"role": "user", "content": "hi"}'
SURROGATE_BODIES = [
    (COMPLETIONS, r'{"prompt": "hi \ud800 there", "max_tokens": 2}'),
    (COMPLETIONS, r'{"prompt": "hi \ud800 there", "max_tokens": 2, "stream": true}'),
    (COMPLETIONS, r'{"prompt": ["fine", "hi \udfff"], "max_tokens": 2}'),
    (COMPLETIONS, r'{"prompt": "hi", "stop": "\ud800", "max_tokens": 2}'),
    (COMPLETIONS, r'{"prompt": "hi", "stop": ["ok", "\ud83d"], "max_tokens": 2}'),
    (COMPLETIONS, r'{"prompt": "hi", "model": "tiny\ud800", "max_tokens": 2}'),
    (COMPLETIONS, r'{"prompt": "hi", "user": "\udc00", "max_tokens": 2}'),  # ignored fields too
    (CHAT_PATH, r'{"messages": [{"role": "user", "content": "hi \ud800 there"}], "max_tokens": 2}'),
    (CHAT_PATH, r'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2, "stream": true}'),
    (CHAT_PATH, r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], "max_tokens": 2}'),
    (CHAT_PATH, r'{"messages": [{"role": "us\ud800er", "content": "hi"}], "max_tokens": 2}'),
    (CHAT_PATH, r'{"messages": [{"role": "user", "content": "hi", "name": "\udc00"}], "max_tokens": 2}'),
    (CHAT_PATH, r'{"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "\ud800"}]}], "max_tokens": 2}'),
    (CHAT_PATH, '{"messages": [' + OK_CHAT + r'], "stop": ["\ud800"], "max_tokens": 2}'),
    (CHAT_PATH, '{"messages": [' + OK_CHAT + r'], "tools": [{"name": "\ud800"}], "tool_choice": "none", "max_tokens": 2}'),
    (CHAT_PATH, '{"messages": [' + OK_CHAT + r'], "tool_choice": {"f": "\ud800"}, "max_tokens": 2}'),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogates_are_400(gw: Gateway, path: str, body: str) -> None:
    before = len(gw.fake.generates())
    err = assert_error(post_raw(gw, path, body), 400)
    assert "Unicode" in err["message"] and err["type"] == "invalid_request_error"
    assert len(gw.fake.generates()) == before  # refused before anything reached the cluster


@pytest.mark.parametrize("raw", [
    b'{"prompt": "hi \xed\xa0\x80", "max_tokens": 2}',  # a surrogate encoded as UTF-8 bytes
    b'{"prompt": "hi \xff\xfe", "max_tokens": 2}',  # not UTF-8
    b'{"prompt": "caf\xe9", "max_tokens": 2}',  # Latin-1
])
def test_invalid_utf8_is_400(gw: Gateway, raw: bytes) -> None:
    err = assert_error(post_raw(gw, COMPLETIONS, raw), 400)
    assert "Unicode" in err["message"]


def test_valid_unicode_is_served(gw: Gateway) -> None:
    # A surrogate *pair* is one valid character; astral and combining characters are fine.
    r = post_raw(gw, COMPLETIONS, r'{"prompt": "emoji \ud83d\ude00 caf\u00e9 e\u0301", "max_tokens": 2}')
    assert r.status_code == 200, r.text
    r = gw.chat(messages=[{"role": "user", "content": "emoji 😀 ünïcödé"}], max_tokens=2)
    assert r.status_code == 200, r.text


# ---- wrong types and values ---------------------------------------------------------------------
def C(**kw: Any) -> str:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw})


def H(**kw: Any) -> str:
    return json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 2, **kw})


def msg(**kw: Any) -> str:
    return H(messages=[{"role": "user", "content": "hi", **kw}])


BAD = [  # (path, body, param or None)
    # not JSON, or JSON but not an object
    (COMPLETIONS, "not json", None),
    (COMPLETIONS, '{"prompt": "hi", ', None),
    (COMPLETIONS, "", None),
    (COMPLETIONS, "[1, 2]", None),
    (COMPLETIONS, '"a string"', None),
    (COMPLETIONS, "null", None),
    (COMPLETIONS, "42", None),
    (CHAT_PATH, "[]", None),
    (COMPLETIONS, '{"prompt": "hi"} trailing', None),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 2, "x": ' + "[" * 5000 + "]" * 5000 + "}", None),  # too deep
    # prompt shapes
    (COMPLETIONS, C(prompt={"text": "hi"}), "prompt"),
    (COMPLETIONS, C(prompt=5), "prompt"),
    (COMPLETIONS, C(prompt=None), "prompt"),
    (COMPLETIONS, C(prompt=[1, "a"]), "prompt"),
    (COMPLETIONS, C(prompt=[[[1]]]), "prompt"),
    (COMPLETIONS, C(prompt=[[1], "a"]), "prompt"),
    (COMPLETIONS, C(prompt=[True, False]), "prompt"),
    (COMPLETIONS, C(prompt=[1.0, 2.0]), "prompt"),
    (COMPLETIONS, C(prompt=[-1, 5]), "prompt"),
    (COMPLETIONS, C(prompt=[5, 512]), "prompt"),
    (COMPLETIONS, C(prompt=[2**63]), "prompt"),
    (COMPLETIONS, C(prompt=[]), "prompt"),
    (COMPLETIONS, C(prompt=[[]]), "prompt"),
    (COMPLETIONS, C(prompt=[[5], []]), "prompt"),
    (COMPLETIONS, C(prompt=[""]), "prompt"),
    # numbers: bools, strings, floats for ints, out of range, NaN / Infinity (JSON extensions)
    (COMPLETIONS, C(max_tokens=True), "max_tokens"),
    (COMPLETIONS, C(max_tokens="16"), "max_tokens"),
    (COMPLETIONS, C(max_tokens=2.5), "max_tokens"),
    (COMPLETIONS, C(max_tokens=2**64), "max_tokens"),
    (COMPLETIONS, C(n=True), "n"),
    (COMPLETIONS, C(n=0), "n"),
    (COMPLETIONS, C(n=10**6), "n"),
    (COMPLETIONS, C(seed=-(2**63) - 1), "seed"),
    (COMPLETIONS, C(temperature=True), "temperature"),
    (COMPLETIONS, C(temperature="hot"), "temperature"),
    (COMPLETIONS, C(temperature=1e308 * 10), "temperature"),  # json.dumps writes Infinity
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 2, "top_p": NaN}', "top_p"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 2, "temperature": -Infinity}', "temperature"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 2, "temperature": 1e400}', "temperature"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 2, "seed": ' + "9" * 5000 + "}", None),
    (COMPLETIONS, C(top_k=-7), "top_k"),
    (COMPLETIONS, C(min_p=2.0), "min_p"),
    (COMPLETIONS, C(presence_penalty=1e300), "presence_penalty"),
    (COMPLETIONS, C(logprobs=True), "logprobs"),
    (COMPLETIONS, C(logprobs=21), "logprobs"),
    (COMPLETIONS, C(min_tokens=3), "min_tokens"),  # more than max_tokens
    (COMPLETIONS, C(stop_token_ids=[-1]), "stop_token_ids"),
    (COMPLETIONS, C(stop_token_ids=[512]), "stop_token_ids"),
    (COMPLETIONS, C(stop_token_ids=[True]), "stop_token_ids"),
    (COMPLETIONS, C(stop_token_ids=5), "stop_token_ids"),
    # strings, bools, objects
    (COMPLETIONS, C(stop=5), "stop"),
    (COMPLETIONS, C(stop=["a", 5]), "stop"),
    (COMPLETIONS, C(stop=[[["a"]]]), "stop"),
    (COMPLETIONS, C(stop=[str(i) for i in range(65)]), "stop"),
    (COMPLETIONS, C(stream="yes"), "stream"),
    (COMPLETIONS, C(stream=1), "stream"),
    (COMPLETIONS, C(ignore_eos=None), "ignore_eos"),
    (COMPLETIONS, C(stream=True, stream_options=5), "stream_options"),
    (COMPLETIONS, C(stream=True, stream_options={"include_usage": "x"}), "stream_options"),
    (COMPLETIONS, C(logit_bias=[1, 2]), "logit_bias"),
    (COMPLETIONS, C(logit_bias={"5": "x"}), "logit_bias"),
    (COMPLETIONS, C(model=5), "model"),
    (COMPLETIONS, C(echo="no"), "echo"),
    # chat: messages and their parts
    (CHAT_PATH, H(messages={"role": "user", "content": "hi"}), "messages"),
    (CHAT_PATH, H(messages="hi"), "messages"),
    (CHAT_PATH, H(messages=None), "messages"),
    (CHAT_PATH, H(messages=[]), "messages"),
    (CHAT_PATH, H(messages=["hi"]), "messages"),
    (CHAT_PATH, H(messages=[[{"role": "user", "content": "hi"}]]), "messages"),
    (CHAT_PATH, H(messages=[{"content": "hi"}]), "messages"),
    (CHAT_PATH, msg(role=5), "messages"),
    (CHAT_PATH, msg(role=None), "messages"),
    (CHAT_PATH, msg(content=5), "messages"),
    (CHAT_PATH, msg(content={"text": "hi"}), "messages"),
    (CHAT_PATH, msg(content=[1, 2]), "messages"),
    (CHAT_PATH, msg(content=["hi"]), "messages"),
    (CHAT_PATH, msg(content=[{"text": "hi"}]), "messages"),
    (CHAT_PATH, msg(content=[{"type": "text", "text": 5}]), "messages"),
    (CHAT_PATH, msg(content=[{"type": 5, "text": "hi"}]), "messages"),
    (CHAT_PATH, msg(content=[{"type": "image_url", "image_url": {"url": "x"}}]), "messages"),
    (CHAT_PATH, msg(content=None), "messages"),  # the template needs content
    (CHAT_PATH, msg(name=5), "messages"),
    (CHAT_PATH, H(logprobs="yes"), "logprobs"),
    (CHAT_PATH, H(logprobs=1), "logprobs"),
    (CHAT_PATH, H(logprobs=True, top_logprobs=True), "top_logprobs"),
    (CHAT_PATH, H(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (CHAT_PATH, H(max_completion_tokens=True), "max_completion_tokens"),
    (CHAT_PATH, H(max_completion_tokens=0), "max_completion_tokens"),
    (CHAT_PATH, H(add_generation_prompt="no"), "add_generation_prompt"),
    (CHAT_PATH, H(tools=5), "tools"),
    (CHAT_PATH, H(tools=[5]), "tools"),
    (CHAT_PATH, H(tools=[{"type": "function"}]), "tools"),
    (CHAT_PATH, H(response_format="json"), "response_format"),
    (CHAT_PATH, H(response_format={"type": "xml"}), "response_format"),
    (CHAT_PATH, H(n=129), "n"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, _, _) in enumerate(BAD)])
def test_wrong_types_and_values_are_400(gw: Gateway, path: str, body: str, param: str | None) -> None:
    err = assert_error(post_raw(gw, path, body), 400, param)
    assert err["type"] == "invalid_request_error" and err["code"] == 400


def test_content_type(gw: Gateway) -> None:
    body = C()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        err = assert_error(post_raw(gw, COMPLETIONS, body, {"content-type": ctype}), 400)
        assert "Content-Type: application/json" in err["message"]
    # JSON types and a missing header (as FastAPI treats it) are read as JSON.
    for headers in ({"content-type": "application/json; charset=utf-8"}, {"content-type": "application/vnd.api+json"}, {}):
        assert post_raw(gw, COMPLETIONS, body, headers).status_code == 200


def test_oversized_body_is_413(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over the cap is refused before it is read whole (by its Content-Length, or
    counted as it arrives when chunked), with an OpenAI error object; the server serves on."""
    import runtime.tokenizer.app as app_mod

    monkeypatch.setattr(app_mod, "MAX_BODY_BYTES", 1 << 20)
    big = json.dumps({"model": MODEL, "prompt": "x " * (1 << 20), "max_tokens": 1}).encode()
    err = assert_error(gw.http.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413)
    assert "1 MiB" in err["message"]

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    assert_error(gw.http.post(COMPLETIONS, content=chunked(), headers={"content-type": "application/json"}), 413)
    assert gw.complete(prompt="hi", max_tokens=2).status_code == 200


def test_random_field_values_never_500(gw: Gateway) -> None:
    """Every field of a valid body, set to values of every JSON type: 200, 400 or 404
    (the model name), never a 500, with an error object whenever it fails."""
    values: list[Any] = [None, True, 0, -1, 1.5, 2**63, "x", "é😀", [], [1], ["a"], [[1]], {}, {"a": [1]}]
    completion = {"prompt": "hi", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                  "n": 1, "stop": ["z"], "seed": 1, "presence_penalty": 0.1, "frequency_penalty": 0.1,
                  "repetition_penalty": 1.1, "ignore_eos": False, "stop_token_ids": [2], "min_tokens": 0,
                  "skip_special_tokens": True, "stream": False, "stream_options": None, "return_token_ids": False,
                  "logit_bias": None, "logprobs": 1, "echo": False, "suffix": None, "best_of": None, "model": MODEL}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 2,
            "logprobs": True, "top_logprobs": 2, "add_generation_prompt": True, "tools": None,
            "tool_choice": None, "response_format": None, "n": 1, "stop": None, "model": MODEL}
    statuses: dict[int, int] = {}
    for path, base in ((COMPLETIONS, completion), (CHAT_PATH, chat)):
        for field, value in itertools.product(list(base), values):
            if field in ("max_tokens", "max_completion_tokens") and value is None:
                continue  # None means the rest of the context: a slow, valid request
            body = {**base, field: value}
            r = gw.http.post(path, json=body)
            no_500(r)
            assert r.status_code in (200, 400, 404), (field, value, r.text)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        for value in values:  # inside a message
            for key in ("role", "content", "name", "tool_calls"):
                r = gw.http.post(CHAT_PATH, json={**chat, "messages": [{"role": "user", "content": "hi", key: value}]})
                no_500(r)
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100  # the sweep hit both sides


# ---- caps --------------------------------------------------------------------------------------
def test_prompt_count_cap(gw: Gateway) -> None:
    before = len(gw.fake.generates())
    # The default: 256 prompts. 10,000 are refused before any is tokenised or sent.
    err = assert_error(gw.complete(prompt=["hi"] * 10_000, max_tokens=1), 400, "prompt")
    assert "256" in err["message"] and "--max-prompts-per-request" in err["message"]
    assert_error(gw.complete(prompt=[[5]] * 257, max_tokens=1), 400, "prompt")
    assert len(gw.fake.generates()) == before
    with limits(gw, max_prompts_per_request=3):
        assert_error(gw.complete(prompt=["a", "b", "c", "d"], max_tokens=1), 400, "prompt")
        r = gw.complete(prompt=["a", "b", "c"], max_tokens=1)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        assert gw.complete(prompt="one prompt, many tokens", max_tokens=1).status_code == 200


def test_request_token_cap(gw: Gateway) -> None:
    with limits(gw, max_request_tokens=40):
        before = len(gw.fake.generates())
        # Counted over all prompts x n, as the workers admit them.
        err = assert_error(gw.complete(prompt=[5] * 21, max_tokens=1, n=2), 400, "prompt")
        assert "42" in err["message"] and "--max-request-tokens" in err["message"]
        assert_error(gw.complete(prompt=[[5] * 20, [6] * 21], max_tokens=1), 400, "prompt")
        assert_error(gw.complete(prompt="hello " * 60, max_tokens=1), 400, "prompt")
        assert_error(gw.chat(messages=[{"role": "user", "content": "hello " * 60}], max_tokens=1), 400, "messages")
        assert_error(gw.chat(messages=[{"role": "user", "content": "hi"}], max_tokens=1, n=8), 400, "messages")
        assert len(gw.fake.generates()) == before
        r = gw.complete(prompt=[5] * 20, max_tokens=1, n=2)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 20


def test_cap_flags_reach_the_config() -> None:
    from runtime.cli import build_parser
    from runtime.config import ClusterConfig

    a = build_parser().parse_args(["up", "--max-prompts-per-request", "8", "--max-request-tokens", "1000",
                                   "--max-queued-requests", "16"])
    assert (a.max_prompts_per_request, a.max_request_tokens, a.max_queued_requests) == (8, 1000, 16)
    d = build_parser().parse_args(["up"])
    cfg = ClusterConfig()
    assert (d.max_prompts_per_request, d.max_request_tokens, d.max_queued_requests) == (
        cfg.max_prompts_per_request, cfg.max_request_tokens, cfg.max_queued_requests)
    for field in ("max_prompts_per_request", "max_request_tokens", "max_queued_requests"):
        with pytest.raises(ValueError, match=field.replace("_", "-")):
            ClusterConfig(**{field: 0})


# ---- tokenisation off the event loop -------------------------------------------------------------
def test_large_prompts_tokenise_as_small_ones(gw: Gateway) -> None:
    # Above INLINE_CHARS the text goes through the thread pool: same ids as the tokenizer's.
    tok = gw.state.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * (2 * INLINE_CHARS // 45)
    for prompt in (text, [text, "short"]):
        r = gw.complete(prompt=prompt, max_tokens=1, return_token_ids=True)
        assert r.status_code == 200, r.text
        texts = prompt if isinstance(prompt, list) else [prompt]
        assert r.json()["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)
    messages = [{"role": "user", "content": text}]
    r = gw.chat(messages=messages, max_tokens=1)
    assert r.status_code == 200, r.text
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert r.json()["usage"]["prompt_tokens"] == len(want["input_ids"] if hasattr(want, "keys") else want)


def test_huge_prompt_does_not_stall_health(gw: Gateway) -> None:
    """A 2 MB prompt takes seconds to tokenise (then fails the caps); /health, asked all
    along, answers in a fraction of that. Before tokenising moved off the event loop, the
    probe sent while it ran waited for all of it."""
    prompt = "The quick brown fox jumps over the lazy dog. " * (2_000_000 // 45)
    done: dict[str, Any] = {}

    def big() -> None:
        t0 = time.monotonic()
        try:
            with httpx.Client(base_url=gw.url, headers=AUTH, timeout=120) as c:
                done["response"] = c.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        finally:
            done["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=big, name="huge-prompt", daemon=True)
    latencies: list[float] = []
    with httpx.Client(base_url=gw.url, timeout=120) as probe:
        assert probe.get("/health").status_code == 200  # connected before the big request starts
        thread.start()
        try:
            while thread.is_alive():
                t0 = time.monotonic()
                assert probe.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        finally:
            thread.join(120)
    assert not thread.is_alive()
    assert_error(done["response"], 400, "prompt")
    took = done["seconds"]
    assert took > 0.3, f"the 2 MB prompt took only {took:.2f} s: nothing to measure against"
    assert len(latencies) >= 5, latencies
    assert max(latencies) < took / 4, f"/health took up to {max(latencies):.2f} s while a {took:.2f} s tokenisation ran"


# ---- overload ----------------------------------------------------------------------------------
@contextmanager
def streams(gw: Gateway, count: int) -> Iterator[list[str]]:
    """`count` long streaming completions, each past its first token; closed on exit."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as client:
        opened, lines, ids = [], [], []
        try:
            for _ in range(count):
                cm = client.stream("POST", COMPLETIONS, json=body)
                r = cm.__enter__()
                opened.append(cm)
                assert r.status_code == 200, r.read()
                lines.append(r.iter_lines())  # kept: a collected line iterator closes the stream
                first = next(line for line in lines[-1] if line.startswith("data: "))
                ids.append(json.loads(first[len("data: "):])["id"])
            yield ids
        finally:
            for cm in reversed(opened):
                cm.__exit__(None, None, None)


def test_overload_is_429(gw: Gateway) -> None:
    gw.fake.step_delay = 0.01
    with limits(gw, max_queued_requests=2):
        # An idle gateway admits a request larger than the bound (it is never refused forever).
        r = gw.complete(prompt="hi", max_tokens=2, n=3)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        with streams(gw, 2):
            assert gw.state.admitted == 2
            before = len(gw.fake.generates())
            for send in (lambda: gw.complete(prompt="hi", max_tokens=2),
                         lambda: gw.chat(messages=CHAT, max_tokens=2),
                         lambda: gw.complete(prompt="hi " * 5000, max_tokens=2, stream=True)):
                r = send()
                err = assert_error(r, 429)
                assert err["type"] == "rate_limit_error" and "--max-queued-requests" in err["message"]
                assert r.headers["retry-after"] == "1"
            assert len(gw.fake.generates()) == before  # refused before tokenising or sending
            # A second live decode worker doubles the room.
            gw.fake.workers = [worker("prefill"), worker("decode"), {**worker("decode"), "id": 1}]
            wait_for(lambda: len(gw.http.get("/health").json()["workers"]) == 3, 3, "the second decode worker")
            assert gw.complete(prompt="hi", max_tokens=2).status_code == 200
        # The streams ended: their room is back.
        wait_for(lambda: gw.state.admitted == 0, 5, "the streams' room to be released")
        assert gw.complete(prompt="hi", max_tokens=2).status_code == 200
    assert _metric(gw.http.get("/metrics").text, 'runtime_request_errors_total{code="429"}') >= 3


def test_default_queue_bound_admits_a_big_benchmark(gw: Gateway) -> None:
    # 1,024 requests in flight on one decode worker, as `runtime bench --concurrency 1024`.
    tickets = [gw.state.admit(1) for _ in range(1024)]
    try:
        assert gw.complete(prompt="hi", max_tokens=2).status_code == 200
    finally:
        for t in tickets:
            t.release()


# ---- keep-alive and 500s -------------------------------------------------------------------------
def _local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("socket").getsockname()[1]


def test_keep_alive_survives_errors(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30, limits=httpx.Limits(max_connections=1)) as client:
        ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        r = client.post(COMPLETIONS, json=ok)
        assert r.status_code == 200
        port = _local_port(r)
        # 4xx errors keep the connection open: every request below reuses it.
        for status, send in (
            (400, lambda: client.post(COMPLETIONS, content=r'{"prompt": "hi \ud800 there"}', headers=JSON_CT)),
            (400, lambda: client.post(CHAT_PATH, content=r'{"messages": [{"role": "user", "content": "\ud800"}]}', headers=JSON_CT)),
            (400, lambda: client.post(COMPLETIONS, content=b"{not json", headers=JSON_CT)),
            (400, lambda: client.post(COMPLETIONS, json={**ok, "prompt": {"a": 1}})),
            (404, lambda: client.post(COMPLETIONS, json={**ok, "model": "nope"})),
            (404, lambda: client.get("/v1/nothing")),
            (200, lambda: client.post(COMPLETIONS, json=ok)),
        ):
            r = send()
            assert r.status_code == status, r.text
            assert r.headers.get("connection") != "close"
            assert _local_port(r) == port

        # A bug: a 500 with an error object that closes the connection properly (a
        # `Connection: close` header, not a reset), and the client's next request works.
        def boom(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected bug")

        monkeypatch.setattr(serving_mod, "completion_logprobs", boom)
        r = client.post(COMPLETIONS, json={**ok, "logprobs": 1})
        err = assert_error(r, 500)
        assert "injected bug" in err["message"] and err["type"] == "server_error"
        assert r.headers["connection"] == "close"
        r = client.post(COMPLETIONS, json=ok)
        assert r.status_code == 200
        assert _local_port(r) != port  # a fresh connection, opened cleanly
        port = _local_port(r)
        # A bug mid-stream: an error event and [DONE], the chunked body ended properly,
        # so the connection stays usable.
        with client.stream("POST", COMPLETIONS, json={**ok, "logprobs": 1, "stream": True}) as s:
            assert s.status_code == 200
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 500
        monkeypatch.undo()
        r = client.post(COMPLETIONS, json={**ok, "logprobs": 1})
        assert r.status_code == 200 and _local_port(r) == port
