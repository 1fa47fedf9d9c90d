"""An engine step out of memory (forced with RUNTIME_TEST_FAIL_ALLOC on every forward of
more than 40 new tokens) over HTTP: the request whose prefill made the step big gets a 503
with an OpenAI error object, a stream decoding in the same step completes unchanged, the
next request gets 200 from the same worker process (no restart) and no KV page leaks. A
worker that does die is restarted, and the log says when to expect it back and when it was."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from runtime import Engine, SamplingParams
from tests.e2e.test_cluster import MODEL, all_pages_free

BIG = "The quick brown fox jumps over the lazy dog. " * 8  # well over 40 tokens
SHORT = "Once upon a time"


def start_failing(start_server, *args: str):
    # Set only while the launcher starts: its children (and restarted workers) inherit it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNTIME_TEST_FAIL_ALLOC", "tokens:40")
        return start_server(*args, "--served-model-name", MODEL, "--page-size", "4", "--kv-cache-tokens", "2048",
                            "--max-model-len", "512")


@pytest.fixture(scope="module")
def coloc(start_server, tiny_model_dir: str):
    return start_failing(start_server, "--model", tiny_model_dir, "--prefill", "0", "--decode", "1")


def complete(server, prompt: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def assert_out_of_memory_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "service_unavailable_error" and err["code"] == 503
    assert "ran out of host memory" in err["message"] and "tried to allocate 8.12 GiB" in err["message"]
    assert "retry" in err["message"] and "shorter prompt" in err["message"]
    assert "the engine step of request " in err["message"]  # which request


def decode_worker(server) -> dict:
    return next(w for w in server.health()["workers"] if w["role"] == "decode")


def test_out_of_memory_step_is_a_503_and_the_worker_keeps_serving(coloc) -> None:
    before = decode_worker(coloc)
    assert_out_of_memory_503(complete(coloc, BIG))
    r = complete(coloc, SHORT)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    after = coloc.wait_for(all_pages_free, timeout=10, what="every KV page free after the failed step")
    w = next(w for w in after["workers"] if w["role"] == "decode")
    assert w["pid"] == before["pid"] and w["restarts"] == 0 and w["alive"]
    assert any("ran out of memory on cpu" in line for line in coloc.lines)  # the worker's log says so


def test_stream_decoding_in_the_failed_step_completes_unchanged(coloc, reference: Engine) -> None:
    expected = reference.generate([SHORT], SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))[0].text
    failures = sum("ran out of memory on cpu" in line for line in coloc.lines)

    async def run() -> tuple[str, httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as h:
            body = {"model": MODEL, "prompt": SHORT, "max_tokens": 80, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            text, big = [], None
            async with h.stream("POST", coloc.url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text.append(chunk["choices"][0]["text"])
                    if len(text) == 3:  # decoding now: the big prompt joins its batch
                        big = await h.post(coloc.url + "/v1/completions", json={
                            "model": MODEL, "prompt": BIG, "max_tokens": 4, "temperature": 0})
            return "".join(text), big

    text, big = asyncio.run(run())
    assert_out_of_memory_503(big)
    assert text == expected
    # The stream's decode row was in the failed step, and ran again.
    failed_step = [line for line in coloc.lines if "ran out of memory on cpu" in line][failures]
    assert "a step of 2 requests" in failed_step and "Run again next step: 1 of its requests" in failed_step
    assert decode_worker(coloc)["restarts"] == 0


def test_disaggregated_prefill_out_of_memory_is_a_503(start_server, tiny_model_dir: str) -> None:
    server = start_failing(start_server, "--model", tiny_model_dir, "--prefill", "1", "--decode", "1",
                           "--transfer", "zmq")
    pids = {w["role"]: w["pid"] for w in server.health()["workers"]}
    assert_out_of_memory_503(complete(server, BIG))
    assert complete(server, SHORT).status_code == 200
    h = server.wait_for(all_pages_free, timeout=10, what="every KV page free on both workers")
    assert {w["role"]: w["pid"] for w in h["workers"]} == pids


def test_killed_worker_restart_is_logged_with_its_bound(coloc) -> None:
    """A worker that does die (kill -9): the controller logs the restart with the time to
    expect it ready in, then how long it took; it serves again within that bound."""
    victim = decode_worker(coloc)
    os.kill(victim["pid"], signal.SIGKILL)
    coloc.wait_for(lambda h: any(w["role"] == "decode" and w["alive"] and w["pid"] != victim["pid"]
                                 for w in h["workers"]), timeout=90, what="the killed worker restarted")
    restarted = [line for line in coloc.lines if "decode worker 0 restarted (pid" in line]
    again = [line for line in coloc.lines if "decode worker 0 ready again after" in line]
    assert len(restarted) == 1 and "expect it ready within 60 s" in restarted[0], restarted
    assert len(again) == 1, coloc.lines[-20:]
    took = float(again[0].split("ready again after ")[1].split(" s")[0])
    assert took < 60
    r = complete(coloc, SHORT)
    assert r.status_code == 200, r.text
