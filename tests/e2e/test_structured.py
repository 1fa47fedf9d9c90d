"""Structured output through `runtime up --prefill 2 --decode 2` on the tiny random model with
the official openai client: the model produces valid JSON only when decoding is constrained,
so json_object / json_schema outputs that parse and validate (also streaming, also n=2), a
regex fullmatch and a named tool call with valid arguments show the constraint held on both
the prefill (first token) and the decode workers. A bad schema is a 400."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from runtime.tokenizer.structured import ENGINE_HAS_GRAMMARS

pytestmark = pytest.mark.skipif(not ENGINE_HAS_GRAMMARS, reason="the engine has no grammar support yet (issue 15)")

MODEL = "tiny"
# Strings bounded by a pattern, not maxLength: xgrammar 0.2.9 compiles maxLength strings to a
# character class that admits raw control characters, which strict JSON parsers refuse.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "likes": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 2}},
    "required": ["name", "age", "likes"],
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"}, "days": {"type": "integer", "maximum": 9}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def cluster(start_server, tiny_model_dir: str):
    return start_server("--model", tiny_model_dir, "--prefill", "2", "--decode", "2",
                        "--served-model-name", MODEL, "--page-size", "4", "--kv-cache-tokens", "4096",
                        "--max-model-len", "1024")


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    c = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield c
    c.close()


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_and_json_object(client: openai.OpenAI) -> None:
    # Sampled (temperature 1) so the random model wanders wherever the grammar lets it.
    r = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=person_format(), n=2,
                                       max_tokens=MAX_TOKENS, temperature=1.0, seed=1)
    assert len(r.choices) == 2
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch
        jsonschema.validate(json.loads(ch.message.content), PERSON)
    # json_object bounds nothing (a string may run on to max_tokens): every choice that
    # stopped is an object, and sampling stops some (`{` is followed by `}` often enough).
    r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=2, n=4,
                                  extra_body={"response_format": {"type": "json_object"}})
    stopped = [ch for ch in r.choices if ch.finish_reason == "stop"]
    assert stopped, r.choices
    for ch in r.choices:
        assert ch.text.startswith("{")
    for ch in stopped:
        assert isinstance(json.loads(ch.text), dict)


def test_json_schema_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=person_format(False), n=2,
                                            max_tokens=MAX_TOKENS, temperature=0.8, seed=3, stream=True)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), PERSON)


def test_regex(client: openai.OpenAI) -> None:
    pattern = r"(yes|no), [0-9]{3}-[a-z]{2,4}"
    for path in ("chat", "completions"):
        if path == "chat":
            r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=1.0, seed=5,
                                               extra_body={"regex": pattern})
            text = r.choices[0].message.content
        else:
            r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, temperature=1.0, seed=5,
                                          extra_body={"regex": pattern})
            text = r.choices[0].text
        assert re.fullmatch(pattern, text), text
        assert r.choices[0].finish_reason == "stop"


def test_named_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=MAX_TOKENS, temperature=1.0, seed=7)
    (ch,) = r.choices
    assert ch.finish_reason == "tool_calls", ch
    assert ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_bad_schema_is_400(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format=bad, max_tokens=8)
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={"regex": "a("})
    assert e.value.body["param"] == "regex"
