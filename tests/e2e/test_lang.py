"""runtime.lang on both backends (a real `runtime up` cluster and an in-process Engine, tiny
model, fp32): the examples give identical greedy outputs, select picks what transformers
finds likeliest, fork branches share the prefix's KV, streaming, and a failing program
raises naming its call with nothing left running and every KV page free."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers

from runtime import Engine
from runtime.common.continuations import split_continuations
from runtime.lang import EngineBackend, ProgramError, RuntimeEndpoint, function, gen, select

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from few_shot_qa import few_shot_qa  # noqa: E402
from json_extraction import PERSON, extract_person  # noqa: E402
from self_consistency import self_consistency  # noqa: E402

PAGE = 4
CHOICES = ["Paris", "London", "the lazy dog", "Lyon"]
LONG = " ".join(["The cache keeps the keys and values of every layer so that decoding is fast."] * 20)


@pytest.fixture(scope="module")
def endpoint(start_server, tiny_model_dir: str):
    server = start_server("--model", tiny_model_dir, "--prefill", "2", "--decode", "2", "--page-size", str(PAGE),
                          "--served-model-name", "tiny")
    backend = RuntimeEndpoint(server.url)
    backend.server = server
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def slow_endpoint(start_server, tiny_model_dir: str):
    """A cluster whose workers sleep 20 ms after each engine step (RUNTIME_TEST_STEP_DELAY):
    a 1,000-token branch runs for 20 s or more, so a 3-token call fails long before it ends.
    On the plain cluster the tiny model streams 1,000 tokens in 0.7-1.3 s (a 3-token regex
    call beside them took 14-43 ms): a stall of about a second under the full suite's load
    (this process parses ~3,000 stream events a second meanwhile) let a branch finish first."""
    old = os.environ.get("RUNTIME_TEST_STEP_DELAY")
    os.environ["RUNTIME_TEST_STEP_DELAY"] = "0.02"
    try:
        server = start_server("--model", tiny_model_dir, "--prefill", "2", "--decode", "2", "--page-size", str(PAGE),
                              "--served-model-name", "tiny")
    finally:
        if old is None:
            del os.environ["RUNTIME_TEST_STEP_DELAY"]
        else:
            os.environ["RUNTIME_TEST_STEP_DELAY"] = old
    backend = RuntimeEndpoint(server.url)
    backend.server = server
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def local(tiny_model_dir: str):
    backend = EngineBackend(Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=PAGE))
    yield backend
    backend.close()
    backend.engine.shutdown()


def pages_free(h: dict) -> bool:
    return all(w["alive"] and w["kv_free_pages"] == w["kv_total_pages"] and w["running"] == 0 for w in h["workers"])


@pytest.mark.parametrize("program,kwargs", [
    (few_shot_qa, {"question": "What is the capital of France?", "choices": CHOICES}),
    (self_consistency, {"question": "Tom has 3 apples and buys 4 more. How many?", "temperature": 0.0}),
    (extract_person, {"text": "Ada Lovelace, 36, lived in London."}),
], ids=["few_shot_qa", "self_consistency", "json_extraction"])
def test_examples_equal_on_both_backends(program, kwargs, local, endpoint) -> None:
    a = program.run(backend=local, **kwargs)
    b = program.run(backend=endpoint, **kwargs)
    assert a.text() == b.text()
    assert a.messages() == b.messages()
    if program is extract_person:
        # strict=False: the tiny random model writes raw control characters inside strings, which
        # xgrammar's JSON grammar lets through (strict JSON wants them escaped).
        jsonschema.validate(json.loads(a["person"], strict=False), PERSON)
    if program is self_consistency:
        assert "Final answer:" in a.text()


def test_run_batch_equals_single_runs(local, endpoint) -> None:
    questions = [{"question": f"What is the capital of {c}?", "choices": CHOICES} for c in ("France", "Italy", "Spain")]
    for backend in (local, endpoint):
        batch = few_shot_qa.run_batch(questions, backend=backend)
        assert [s.text() for s in batch] == [few_shot_qa.run(backend=backend, **q).text() for q in questions]


def hf_mean_logprobs(model_dir: str, prompt: str, choices: list[str]) -> list[float]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ctx, conts = split_continuations(lambda t: tok(t)["input_ids"], prompt, choices)
    means = []
    for c in conts:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + c])).logits[0].float(), dim=-1)
        means.append(sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(c)) / len(c))
    return means


@function
def pick(s, prompt: str):
    s += prompt + select("choice", choices=CHOICES)


@pytest.mark.parametrize("prompt", ["Paris is the capital of France. The capital of France is ",
                                    "Hello, world! How are you today? I am"])
def test_select_picks_the_likeliest_choice(prompt: str, local, endpoint, tiny_model_dir: str) -> None:
    ref = hf_mean_logprobs(tiny_model_dir, prompt, CHOICES)
    best = CHOICES[max(range(len(ref)), key=ref.__getitem__)]
    for backend in (local, endpoint):
        s = pick.run(prompt=prompt, backend=backend)
        assert s["choice"] == best
        assert s.get_meta_info("choice")["mean_logprobs"] == pytest.approx(ref, abs=1e-3)


@function
def fan_out(s, prompt: str, branches: list):
    s += prompt
    forks = s.fork(4)
    for i, f in enumerate(forks):
        f += f" Branch {i}:" + gen("out", max_tokens=4)
    s.join(forks)
    branches.extend(forks)


def test_fork_branches_share_the_prefix(local, endpoint) -> None:
    shared = len(local.tokenizer(LONG)["input_ids"])
    assert shared > 300
    for backend in (local, endpoint):
        branches: list = []
        s = fan_out.run(prompt=LONG, branches=branches, backend=backend)
        assert s.text() == LONG and len(branches) == 4
        for f in branches:
            assert f.get_meta_info("out")["cached_tokens"] >= (shared - 1) // PAGE * PAGE


def test_stream_yields_pieces_as_generated(local, endpoint) -> None:
    @function
    def story(s):
        s += "Once upon a time" + gen("rest", max_tokens=24, ignore_eos=True)

    for backend in (local, endpoint):
        s = story.run(backend=backend, stream=True)
        pieces = list(s.text_iter("rest"))
        assert len(pieces) > 1
        assert "".join(pieces) == s["rest"]


@function
def failing(s, branches: list):
    forks = s.fork(3)
    branches.extend(forks)
    for f in forks:  # near the context (1,024), on slow_endpoint 20 s or more: still running when "code" fails
        f += "Once" + gen("long", max_tokens=1000, ignore_eos=True)
    s += "Code: " + gen("code", regex=r"[0-9]{40}", max_tokens=3)
    s["code"]  # raises: the regex cannot be met in 3 tokens; the branches are still running


def test_failure_names_the_call_aborts_and_frees_kv(local, slow_endpoint) -> None:
    for backend in (local, slow_endpoint):
        branches: list = []
        t0 = time.monotonic()
        with pytest.raises(ProgramError, match=r"gen 'code' failed: .*regex within max_tokens=3"):
            failing.run(branches=branches, backend=backend)
        took = time.monotonic() - t0
        for f in branches:  # cancelled mid-generation, not run to max_tokens
            with pytest.raises(ProgramError, match="gen 'long' failed: (aborted|not run)"):
                f["long"]
                log = "".join(backend.server.lines[-40:]) if backend is slow_endpoint else ""
                pytest.fail(f"{type(backend).__name__}: a branch ran to its end ({f.get_meta_info('long')}) before "
                            f"'code' failed ({took:.1f} s after the start)\n{log}")
    core = local.engine.core
    assert not core.requests
    assert core.pool.num_free + core.cache.evictable_pages == core.pool.total_pages
    slow_endpoint.server.wait_for(pages_free, timeout=30, what="every worker's KV pages free")


def test_server_error_names_the_call(local, endpoint) -> None:
    @function
    def bad(s):
        s += "x" + gen("bad", regex="[", max_tokens=4)

    for backend in (local, endpoint):
        with pytest.raises(ProgramError, match="gen 'bad' failed"):
            bad.run(backend=backend)
