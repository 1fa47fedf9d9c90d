"""runtime.lang with the real SmolLM2-135M-Instruct weights (fp32, CPU) on both backends: a
`runtime up --prefill 2 --decode 1` server and an in-process Engine. The examples give
identical greedy outputs that make sense; `select` picks the choice with the highest mean
token logprob under transformers' own model; a 4-way fork after a ~700-token prompt finds
the prompt's full pages in the prefix cache on every branch. One server, one Engine and
one transformers model are shared by the whole module (CI time)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers

from runtime import Engine
from runtime.lang import EngineBackend, RuntimeEndpoint, function, select
from tests.e2e.test_lang import fan_out  # the same 4-way fork program as with the tiny model

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from few_shot_qa import few_shot_qa  # noqa: E402
from json_extraction import PERSON, extract_person  # noqa: E402
from self_consistency import self_consistency  # noqa: E402

pytestmark = pytest.mark.slow

PAGE = 16
KV_TOKENS = 8192  # plenty for these programs; the CPU default (32k) would allocate ~1.5 GB per engine
LONG = " ".join(f"Fact {i}: {i} times {i} is {i * i}." for i in range(1, 41))  # 690 SmolLM2 tokens


# Two prefill workers: a fork's branches find the prefix only if routing sends them to the
# worker that cached it (with round_robin the fork test fails). One decode worker: a second
# one adds nothing checked here and, on 2 cores, doubles the examples' time.
@pytest.fixture(scope="module")
def endpoint(start_server, smollm2_dir: str):
    server = start_server("--model", smollm2_dir, "--dtype", "float32", "--prefill", "2", "--decode", "1",
                          "--page-size", str(PAGE), "--kv-cache-tokens", str(KV_TOKENS), "--served-model-name", "smol")
    backend = RuntimeEndpoint(server.url)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def local(smollm2_dir: str):
    backend = EngineBackend(Engine(smollm2_dir, device="cpu", dtype="float32", page_size=PAGE, kv_cache_tokens=KV_TOKENS))
    yield backend
    backend.close()
    backend.engine.shutdown()


@pytest.fixture(scope="module")
def hf(smollm2_dir: str):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


def test_few_shot_qa_equal_on_both_backends(local, endpoint) -> None:
    kwargs = {"question": "What is the capital of France?", "choices": ["London", "Paris", "Lyon"]}
    a = few_shot_qa.run(backend=local, **kwargs)
    b = few_shot_qa.run(backend=endpoint, **kwargs)
    assert a.text() == b.text()
    assert a["answer"] == "Paris"
    means = a.get_meta_info("answer")["mean_logprobs"]
    assert means == pytest.approx(b.get_meta_info("answer")["mean_logprobs"], abs=1e-3)
    assert max(means) == means[1]


def test_self_consistency_equal_on_both_backends(local, endpoint) -> None:
    @function
    def voted(s, out: list):
        out.extend(self_consistency(s, "Tom has 3 apples and buys 4 more. How many apples does he have?",
                                    temperature=0.0))

    answers: dict[str, list[str]] = {"local": [], "endpoint": []}
    a = voted.run(out=answers["local"], backend=local)
    b = voted.run(out=answers["endpoint"], backend=endpoint)
    assert a.text() == b.text()
    assert answers["local"] == answers["endpoint"]
    # Greedy: the four branches read the same prompt, so they agree; each answer meets the regex.
    votes = answers["local"]
    assert len(votes) == 4 and len(set(votes)) == 1 and re.fullmatch(r"[0-9]{1,3}", votes[0])
    assert a.text().endswith(f"Final answer: {votes[0]}")


def test_json_extraction_equal_on_both_backends(local, endpoint) -> None:
    text = "Ada Lovelace, 36, lived in London."
    a = extract_person.run(text=text, backend=local)
    b = extract_person.run(text=text, backend=endpoint)
    assert a.text() == b.text()
    assert a.messages() == b.messages()
    person = json.loads(a["person"])  # strict JSON: the real model escapes what it writes
    jsonschema.validate(person, PERSON)
    assert (person["name"], person["city"]) == ("Ada Lovelace", "London")
    assert a.get_meta_info("person")["finish_reason"] == "stop"


def hf_token_logprobs(hf, prompt: str, choices: list[str]) -> list[list[float]]:
    """Each choice's token logprobs after the prompt, from transformers alone. The prompts
    below do not end in a space, so `prompt + choice` tokenizes as the prompt's tokens then
    the choice's (asserted)."""
    tok, model = hf
    ctx = tok(prompt)["input_ids"]
    out = []
    for choice in choices:
        ids = tok(prompt + choice)["input_ids"]
        assert ids[:len(ctx)] == ctx
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        out.append([lp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids))])
    return out


@function
def pick(s, prompt: str, choices: list[str]):
    s += prompt + select("choice", choices=choices)


FEW_SHOT_SYMBOLS = "".join(f"The chemical symbol for {e} is {sym}.\n" for e, sym in
                           [("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("sodium", "Na"), ("lead", "Pb")])


@pytest.mark.parametrize("prompt,choices", [
    # By the sum of logprobs " London" (one token, -4.4) would win over " the city of Paris"
    # (4 tokens, -7.9); by the mean (-4.4 vs -2.0) Paris does: the length normalisation decides.
    ("The capital of France is", [" London", " the city of Paris", " Tokyo", " Berlin"]),
    # A prompt of several pages: the choices are scored over the prompt's cached KV.
    (FEW_SHOT_SYMBOLS + "The chemical symbol for gold is", [" Ag", " Au", " Gold", " Au, from the Latin aurum"]),
], ids=["normalised", "cached_prompt"])
def test_select_picks_what_transformers_finds_likeliest(prompt: str, choices: list[str], local, endpoint, hf) -> None:
    ref = hf_token_logprobs(hf, prompt, choices)
    means = [sum(lp) / len(lp) for lp in ref]
    ranked = sorted(means, reverse=True)
    assert ranked[0] - ranked[1] > 0.3  # a clear winner: the test is about the ranking, not noise
    best = choices[means.index(ranked[0])]
    for backend in (local, endpoint):
        s = pick.run(prompt=prompt, choices=choices, backend=backend)
        meta = s.get_meta_info("choice")
        assert s["choice"] == best
        assert s.text() == prompt + best
        assert meta["mean_logprobs"] == pytest.approx(means, abs=1e-3)
        for got, want in zip(meta["token_logprobs"], ref):
            assert got == pytest.approx(want, abs=1e-3)


def test_fork_branches_share_the_long_prompt(local, endpoint, hf) -> None:
    tok = hf[0]
    prompt_ids = tok(LONG)["input_ids"]
    assert len(prompt_ids) > 600
    outs = []
    for backend in (local, endpoint):
        branches: list = []
        s = fan_out.run(prompt=LONG, branches=branches, backend=backend)
        assert s.text() == LONG and len(branches) == 4
        for f in branches:
            ids = tok(f.text()[:len(f.text()) - len(f["out"])])["input_ids"]
            shared = next((n for n, (x, y) in enumerate(zip(prompt_ids, ids)) if x != y), len(prompt_ids))
            meta = f.get_meta_info("out")
            assert meta["prompt_tokens"] == len(ids)
            # Every full page of the shared prompt came from the prefix cache (fork computed it once).
            assert meta["cached_tokens"] == shared // PAGE * PAGE, (backend, meta, shared)
        outs.append([f["out"] for f in branches])
    assert outs[0] == outs[1]
