"""`runtime up --prefill 0 --decode 2`: colocated engines, each worker prefilling and
decoding its own requests with no KV transfer (the baseline of the disaggregation
benchmarks). Same behaviour as the disaggregated cluster: outputs equal the single engine,
streaming and n, prefix-cache hits, no KV leaked by cancelled streams, a killed worker's
streamed request fails instead of being repeated, and the service survives the kill."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from runtime import Engine
from tests.e2e.test_cluster import (
    MODEL, assert_cancelled_streams_free_pages, assert_chat_stream_and_n, assert_greedy_equals_engine,
    assert_shared_prefix_cached, assert_survives_decode_worker_kill, idle,
)
from tests.unit.test_engine import PROMPTS


@pytest.fixture(scope="module")
def coloc(start_server, tiny_model_dir: str):
    return start_server("--model", tiny_model_dir, "--prefill", "0", "--decode", "2",
                        "--served-model-name", MODEL, "--page-size", "4", "--kv-cache-tokens", "4096",
                        "--max-model-len", "1024")


def test_greedy_equals_single_engine(coloc, reference: Engine) -> None:
    assert_greedy_equals_engine(coloc, reference)
    # Both workers alive on cpu. Waited for, not read once: in about one full-suite run in ten
    # the second worker showed alive False and no device right after the greedy requests
    # (not understood yet; it was not reproduced alone); a worker that stays dead still fails.
    h = coloc.wait_for(lambda h: all(w["alive"] and w["device"] == "cpu" for w in h["workers"]), timeout=15,
                       what="both workers alive on cpu")
    assert [(w["role"], w["id"]) for w in h["workers"]] == [("decode", 0), ("decode", 1)]
    # Both engines served some of the concurrent requests (least-loaded routing).
    coloc.wait_for(lambda h: all(w["served"] > 0 for w in h["workers"]), timeout=5, what="both workers served")


def test_chat_stream_and_n(coloc, reference: Engine) -> None:
    assert_chat_stream_and_n(coloc, reference)


def test_repeated_prefix_hits_the_workers_cache(coloc) -> None:
    assert_shared_prefix_cached(coloc)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rate = next(float(line.split()[-1]) for line in httpx.get(coloc.url + "/metrics", timeout=5).text.splitlines()
                    if line.startswith("runtime_prefix_cache_hit_rate "))
        if rate > 0:
            break
        time.sleep(0.3)
    assert rate > 0, "the colocated workers' prefix-cache hits are missing from /metrics"


def test_cancelled_streams_free_every_page(coloc) -> None:
    assert_cancelled_streams_free_pages(coloc)


def test_streamed_requests_fail_rather_than_repeat_when_their_worker_dies(coloc) -> None:
    """Tokens already reached the client: the controller must not retry such a request on
    another worker (its text would start over inside the same stream); its stream ends with
    an error instead. Streams on the surviving worker complete."""
    # 600 tokens: a stream must still run when the last of the 8 first tokens arrives (with 200,
    # one full-suite run saw every stream finish before the kill)
    streams, max_tokens = 8, 600
    started = asyncio.Semaphore(0)

    async def one(h: httpx.AsyncClient, i: int) -> list[dict]:
        body = {"model": MODEL, "prompt": f"{i} " + PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        events = []
        async with h.stream("POST", coloc.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:
                        started.release()
        return events

    async def run() -> list[list[dict]]:
        async with httpx.AsyncClient(timeout=120) as h:
            tasks = [asyncio.create_task(one(h, i)) for i in range(streams)]
            for _ in range(streams):  # every request has sent a token to its client
                await started.acquire()
            at_kill.update(await asyncio.to_thread(coloc.health))
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    # From an idle cluster, so the router spreads the streams over both workers.
    h = coloc.wait_for(idle, timeout=90, what="every worker alive and idle")
    victim = next(w for w in h["workers"] if w["id"] == 0)
    at_kill: dict = {}
    results = asyncio.run(run())
    failed = 0
    for events in results:
        if "error" in events[-1]:
            assert "died" in events[-1]["error"]["message"], events[-1]
            failed += 1
        else:  # a retry would have appended a second run of tokens to this one
            assert events[-1]["usage"]["completion_tokens"] == max_tokens
    # What the workers ran when the victim was killed, and what the launcher logged about
    # worker deaths: without them a failure here says too little (a CI run once saw all 8
    # streams fail).
    running = {w["id"]: (w["alive"], w["running"], w["inflight"]) for w in at_kill.get("workers", [])}
    deaths = [line.rstrip() for line in coloc.lines
              if any(k in line for k in ("died", "heartbeats", "exited", "restarted", "Traceback", "Error"))]
    assert 0 < failed < streams, f"{failed} of {streams} failed; (alive, running, inflight) by worker at the kill: " \
        f"{running}; launcher log: {deaths[-30:]}"
    coloc.wait_for(lambda h: all(w["alive"] for w in h["workers"]) and h["workers"][0]["pid"] != victim["pid"],
                   timeout=60, what="the killed worker restarted")


def test_kill_worker_under_load_later_requests_succeed(coloc) -> None:
    assert_survives_decode_worker_kill(coloc, 1, requests=12, min_ok=4)
    coloc.wait_for(lambda h: all(w["alive"] for w in h["workers"]), timeout=60, what="both workers alive again")


@pytest.fixture(scope="module", params=["0", "1"], ids=["colocated", "disaggregated"])
def plain_schedule(request, start_server, tiny_model_dir: str):
    """A decode worker without the overlap schedule (the default elsewhere: each step
    launched before the last one's tokens are read, runtime/engine/overlap.py): prefilling and
    decoding its own requests, or decoding what a prefill worker sends it."""
    return start_server("--model", tiny_model_dir, "--prefill", request.param, "--decode", "1", "--disable-overlap-schedule",
                        "--served-model-name", MODEL, "--page-size", "4", "--kv-cache-tokens", "4096",
                        "--max-model-len", "1024")


def test_plain_schedule_serves_what_the_overlapped_engine_generates(plain_schedule, reference: Engine) -> None:
    """--disable-overlap-schedule: the same outputs, streaming, n and usage counts as the
    reference engine (overlapped, which must not count a token still in flight), and
    cancelled streams leave no page behind."""
    assert_greedy_equals_engine(plain_schedule, reference)
    assert_chat_stream_and_n(plain_schedule, reference)
    assert_cancelled_streams_free_pages(plain_schedule)


def test_no_worker_at_all_is_a_cli_error() -> None:
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "up", "--prefill", "0", "--decode", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--decode must be at least 1" in r.stderr and "ready:" not in r.stdout
