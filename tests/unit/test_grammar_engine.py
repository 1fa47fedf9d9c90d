"""Grammar-constrained decoding in the engine (xgrammar): the tiny random model produces
valid JSON, regex matches and grammar sentences only when constrained; constrained and
free requests share a batch (speculation and jump-forward: test_grammar_speculative.py);
bad grammars are a ValueError naming the field."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.common.sampling_params import SamplingParamError
from runtime.engine.grammar import GrammarError
from runtime.engine.speculative.eagle_head import EagleHead, save_head
from runtime.messages import params_from_dict, params_to_dict

KW = dict(device="cpu", dtype="float32", page_size=4)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
# Sums of numbers, with parentheses; the Python check below parses the same language.
EBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9] [0-9]? | "(" expr ")"'
# Per constrained request of `constrained()` (json_schema, json_object, regex, ebnf), then free ones.
# A json_object has no bound on its strings: greedy ends within max_tokens from this prompt.
PROMPTS = ["The quick brown fox", "Paris is the capital", "Hello, world! How are", "Numbers: 0 1 2 3",
           "def add(a, b):", "Once upon a time"]
COPY = "The cat sat on the mat. The cat sat on the mat. The cat sat on the"


def parses_ebnf(s: str) -> bool:
    # No recursive regex in `re`: replace innermost parenthesised sums by a number until
    # none are left, then match a flat sum.
    prev = None
    while prev != s:
        prev, s = s, re.sub(r"\(([0-9]{1,2}(?:[+-][0-9]{1,2})*)\)", "0", s)
    return re.fullmatch(r"[0-9]{1,2}(?:[+-][0-9]{1,2})*", s) is not None


def constrained(temperature: float, seed: int = 0) -> list[SamplingParams]:
    base = SamplingParams(max_tokens=200, temperature=temperature, seed=seed)
    return [replace(base, json_schema=json.dumps(SCHEMA)), replace(base, json_schema='{"type": "object"}'),
            replace(base, regex=REGEX), replace(base, ebnf=EBNF)]


def run_mixed(engine: Engine, temperature: float, seed: int = 0) -> list:
    """One batch: constrained requests of every kind next to free ones, through the engine
    core (as generate() does, but with a different SamplingParams per request)."""
    core = engine.core
    params = constrained(temperature, seed) + [SamplingParams(max_tokens=24, temperature=temperature, seed=seed + 9)] * 2
    tok = engine.tokenizer
    reqs = [core.add_request(f"r{i}", tok(PROMPTS[i % len(PROMPTS)])["input_ids"], p) for i, p in enumerate(params)]
    reqs.append(core.add_request("copy", tok(COPY)["input_ids"], SamplingParams(max_tokens=24, temperature=0.0,
                                                                                ignore_eos=True)))
    while core.has_work:
        core.step()
    core.scheduler.check_no_leak()
    return reqs


def check_valid(engine: Engine, reqs: list) -> None:
    texts = [engine.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in reqs]
    for r, t in zip(reqs[:4], texts):
        assert r.finish_reason == "stop", (r.rid, r.finish_reason, t)
        assert r.grammar is None  # released
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert isinstance(json.loads(texts[1]), dict)
    assert re.fullmatch(REGEX, texts[2]), texts[2]
    assert parses_ebnf(texts[3]), texts[3]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Engine:
    return Engine(tiny_model_dir, **KW)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mixed_batch_outputs_are_valid(engine: Engine, temperature: float) -> None:
    reqs = run_mixed(engine, temperature)
    check_valid(engine, reqs)
    # Unconstrained, the same model writes no JSON at all: the mask is what makes it valid.
    free = engine.generate(PROMPTS[0], SamplingParams(max_tokens=40, temperature=temperature, seed=0))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_generate_and_compile_cache(engine: Engine) -> None:
    before = engine.core.grammars.num_compiles
    params = SamplingParams(max_tokens=200, temperature=0.0, json_schema=json.dumps(SCHEMA) + " ")
    res = engine.generate(PROMPTS[:3], params)
    assert engine.core.grammars.num_compiles == before + 1  # once for the three requests
    for r in res:
        assert r.finish_reason == "stop" and r.stop_reason == 2  # ended on EOS, not in the text
        # strict=False: xgrammar's JSON strings admit raw control characters (U+0000-U+001F),
        # which RFC 8259 wants escaped.
        jsonschema.validate(json.loads(r.text, strict=False), SCHEMA)
    engine.core.scheduler.check_no_leak()


def test_grammar_backend_is_warmed_at_start(tiny_model_dir: str) -> None:
    """The engine makes xgrammar's tokenizer info on its compile thread when it starts, so the
    first constrained request does not wait for the import (nor stall the caller's loop)."""
    e = Engine(tiny_model_dir, device="cpu", dtype="float32")
    g = e.core.grammars
    g._executor().submit(lambda: None).result(timeout=60)  # the single compile thread: warm ran first
    assert g._compiler is not None and g.num_compiles == 0
    e.shutdown()


def test_grammar_that_cannot_finish_ends_with_length(engine: Engine) -> None:
    r = engine.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, regex=r"a{10}"))[0]
    assert (r.finish_reason, r.text) == ("length", "a" * 6)
    r = engine.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.0, regex=r"abc"))[0]
    assert (r.finish_reason, r.text) == ("stop", "abc")
    engine.core.scheduler.check_no_leak()


@pytest.mark.parametrize("field,text", [("json_schema", '{"type": "nope"}'), ("json_schema", "not json"),
                                        ("regex", "a(b"), ("ebnf", "root ::= undefined_rule")])
def test_invalid_grammar_is_a_value_error_naming_the_field(engine: Engine, field: str, text: str) -> None:
    with pytest.raises(GrammarError, match=field) as e:
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=4, **{field: text}))
    assert isinstance(e.value, ValueError) and e.value.param == field
    assert "/project/" not in str(e.value)  # xgrammar's C++ log prefix is cut
    assert not engine.core.requests
    engine.core.scheduler.check_no_leak()


def test_params_validate_and_travel() -> None:
    with pytest.raises(SamplingParamError, match="at most one") as e:
        SamplingParams(regex="a", ebnf='root ::= "a"')
    assert e.value.param == "ebnf"
    with pytest.raises(SamplingParamError, match="regex must be a string"):
        SamplingParams(regex=3)  # type: ignore[arg-type]
    p = SamplingParams(max_tokens=5, json_schema='{"type": "object"}')
    assert params_from_dict(params_to_dict(p)) == p
    old = params_to_dict(SamplingParams(max_tokens=5))
    for k in ("json_schema", "regex", "ebnf"):
        del old[k]
    assert params_from_dict(old).json_schema is None  # a peer without the fields


def test_retraction_recompute_keeps_the_matcher_in_step(tiny_model_dir: str) -> None:
    """A KV pool too small for the batch retracts requests; recomputed as prompt+output, they
    keep their tokens and the matcher accepts each token once: outputs equal a roomy run."""
    roomy = Engine(tiny_model_dir, **KW)
    tight = Engine(tiny_model_dir, **KW, kv_cache_tokens=100)
    ref = run_mixed(roomy, 0.0)
    got = run_mixed(tight, 0.0)
    assert tight.core.scheduler.num_retractions > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    check_valid(tight, got)


def test_disaggregated_first_token_from_the_prefill_engine(engine: Engine, tiny_model_dir: str) -> None:
    """The prefill engine samples the first token under the grammar (max_tokens=1, as the
    prefill worker runs it); the decode engine's matcher starts past it."""
    prefill = engine.core
    decode = Engine(tiny_model_dir, **KW).core
    for i, p in enumerate(constrained(0.0)):
        ids = engine.tokenizer(PROMPTS[i])["input_ids"]
        req = prefill.add_request(f"p{i}", ids, replace(p, max_tokens=1, stop=[], n=1))
        req.hold_kv = True
        while not req.finished:
            prefill.step()
        first = req.output_ids[0]
        pages = decode.pool.alloc(decode.pool.pages_for(len(ids)))
        decode.pool.kv[pages] = prefill.pool.kv[req.pages[: len(pages)]]
        prefill.scheduler.release_held(req)
        with pytest.raises(GrammarError, match="not allowed"):
            bad = next(t for t in range(3, 300) if t != first and not decode.grammars.matcher(p).accept(t))
            decode.add_prefilled(f"bad{i}", ids, p, pages, bad, None, 0)
        decode.add_prefilled(f"d{i}", ids, p, pages, first, None, 0)
        dreq = decode.requests[f"d{i}"]
        while not dreq.finished:
            decode.step()
        local = engine.core.add_request(f"l{i}", ids, p)
        while not local.finished:
            engine.core.step()
        assert dreq.output_ids == local.output_ids and dreq.finish_reason == "stop"
    decode.scheduler.check_no_leak()
    prefill.scheduler.check_no_leak()
