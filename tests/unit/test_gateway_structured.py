"""Structured output and tool calls at the gateway, against the fake controller of
test_gateway.py: the SamplingParams built for response_format / regex / ebnf / tool_choice,
400s for bad schemas, regexes, grammars, two constraints and unknown tools, the
`<tool_call>` parser, forced calls turned into tool_calls, tool-call stream deltas, and
tools and tool turns rendered into the prompt."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from runtime.tokenizer.protocol import ChatCompletionRequest
from runtime.tokenizer.structured import ENGINE_HAS_GRAMMARS, JSON_OBJECT, GrammarChecker, request_constraint
from runtime.tokenizer.tools import (
    ToolCallStream,
    ToolOutput,
    call_schema,
    check_tools,
    parse_forced,
    parse_tool_calls,
    render_messages,
)
from tests.unit.test_gateway import (  # noqa: F401 (gw and _fresh_fake are fixtures)
    CHAT,
    MODEL,
    Gateway,
    _fresh_fake,
    assert_error,
    gw,
)

needs_grammars = pytest.mark.skipif(
    not ENGINE_HAS_GRAMMARS, reason="SamplingParams has no json_schema/regex/ebnf yet (the engine side of issue 15)")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                            "pet": {"type": "object", "properties": {"kind": {"type": "string"}}}},
          "required": ["name", "age"]}


@pytest.fixture(autouse=True)
def _no_leftover_scripts(gw: Gateway) -> Iterator[None]:
    yield
    gw.fake.scripts = []


def ids(gw: Gateway, text: str) -> list[int]:
    return list(gw.state.tokenizer(text)["input_ids"])


def last_params(gw: Gateway) -> dict[str, Any]:
    return gw.fake.generates()[-1].params


def req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": CHAT, **kw})


# ---- the parser ----------------------------------------------------------------------------------
def test_parse_one_call() -> None:
    content, calls = parse_tool_calls(f"<tool_call>\n{CALL}\n</tool_call>")
    assert content is None
    (c,) = calls
    assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 10
    assert c["function"]["name"] == "get_weather"
    assert json.loads(c["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_parse_two_calls_and_text_around() -> None:
    other = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    text = f"Let me check. <tool_call>{CALL}</tool_call> and <tool_call>{other}</tool_call> done."
    content, calls = parse_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2
    assert content == "Let me check.  and  done."


def test_malformed_or_unclosed_blocks_stay_text() -> None:
    for text in ("<tool_call>{\"name\": \"f\", \"arguments\": {oops}</tool_call>",
                 "<tool_call>[1, 2]</tool_call>",
                 '<tool_call>{"arguments": {}}</tool_call>',  # no name
                 f"<tool_call>{CALL}",  # cut off by max_tokens
                 "no calls at all <tool_", ""):
        assert parse_tool_calls(text) == (text, [])
    content, calls = parse_tool_calls(f"<tool_call>bad</tool_call><tool_call>{CALL}</tool_call>")
    assert content == "<tool_call>bad</tool_call>" and len(calls) == 1


def test_stream_parser_any_split() -> None:
    """Fed one character at a time, the parser gives the same content and calls as whole, and
    never lets any of a `<tool_call>` block out as content."""
    text = f"Hi <b> <tool_call>{CALL}</tool_call> bye <tool_"
    p = ToolCallStream()
    pieces = [p.feed(ch) for ch in text]
    assert "<tool_call" not in "".join(pieces) and "Paris" not in "".join(pieces)
    assert "".join(pieces) + p.flush() == "Hi <b>  bye <tool_"
    assert [c["function"]["name"] for c in p.calls] == ["get_weather"]


def test_forced_output_to_tool_calls() -> None:
    out = ToolOutput("named")
    content, calls, finish = out.message(CALL, "stop")
    assert content is None and finish == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    # JSON cut off by max_tokens: the text, as it is, with finish_reason "length".
    assert out.message(CALL[:20], "length") == (CALL[:20], None, "length")
    assert parse_forced("  " + CALL + "\n")["function"]["name"] == "get_weather"


def test_call_schema_validates_calls() -> None:
    tools = check_tools(req(tools=TOOLS, tool_choice="required"))
    any_call = call_schema(tools, None)
    jsonschema.validate(json.loads(CALL), any_call)
    jsonschema.validate({"name": "get_time", "arguments": {"tz": "UTC"}}, any_call)
    for bad in ({"name": "nope", "arguments": {}}, {"name": "get_weather", "arguments": {"days": 1}},
                {"name": "get_weather"}, {"name": "get_weather", "arguments": {"city": "x"}, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, any_call)
    named = call_schema(tools, "get_time")
    jsonschema.validate({"name": "get_time", "arguments": {}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(CALL), named)
    # The schemas the gateway builds compile with xgrammar.
    checker = GrammarChecker()
    from runtime.tokenizer.structured import Constraint
    assert checker.error(Constraint("json_schema", json.dumps(any_call), "tools")) is None


def test_request_constraints() -> None:
    assert request_constraint(req()) is None
    assert request_constraint(req(response_format={"type": "text"})) is None
    assert request_constraint(req(response_format={"type": "json_object"})).text == JSON_OBJECT
    c = request_constraint(req(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}))
    assert (c.kind, json.loads(c.text), c.param) == ("json_schema", PERSON, "response_format")
    # strict: additionalProperties false on every object that does not set it, nested too.
    c = request_constraint(req(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}))
    strict = json.loads(c.text)
    assert strict["additionalProperties"] is False and strict["properties"]["pet"]["additionalProperties"] is False
    jsonschema.validate({"name": "a", "age": 1, "pet": {"kind": "cat"}}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "a", "age": 1, "x": 0}, strict)
    assert request_constraint(req(regex="[0-9]+")).kind == "regex"
    assert request_constraint(req(ebnf='root ::= "a"')).kind == "ebnf"


# ---- the prompt ----------------------------------------------------------------------------------
def test_render_tools_hermes_style() -> None:
    tools = check_tools(req(tools=TOOLS))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out, native_tools = render_messages(messages, tools, native=False)
    assert native_tools is None and len(out) == 4
    system = out[0]["content"]
    assert system.startswith("Be brief.") and "<tools>" in system and "<tool_call>" in system
    assert '"name": "get_weather"' in system and '"Weather by city"' in system
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "content": "<tool_response>\nsunny, 21 C\n</tool_response>"}
    # A template that renders tools itself gets them (and arguments as objects) unchanged.
    out, native_tools = render_messages(messages, tools, native=True)
    assert [t["function"]["name"] for t in native_tools] == ["get_weather", "get_time"]
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    # Without a system message, one is added first.
    out, _ = render_messages(messages[1:2], tools, native=False)
    assert out[0]["role"] == "system" and out[1] == messages[1]


def test_tools_and_tool_turns_reach_the_prompt(gw: Gateway) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = gw.chat(messages=messages, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert r.status_code == 200, r.text
    prompt = gw.state.tokenizer.decode(gw.fake.generates()[-1].prompt_ids)
    assert prompt.startswith("<|im_start|>system\nYou are a function calling AI model.")
    assert "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>" in prompt
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ---- the SamplingParams built --------------------------------------------------------------------
@needs_grammars
def test_sampling_params_carry_the_constraint(gw: Gateway) -> None:
    cases = [
        ({"response_format": {"type": "text"}}, {}),
        ({"response_format": {"type": "json_object"}}, {"json_schema": JSON_OBJECT}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, {"json_schema": PERSON}),
        ({"regex": "(yes|no)"}, {"regex": "(yes|no)"}),
        ({"ebnf": 'root ::= "a" | "b"'}, {"ebnf": 'root ::= "a" | "b"'}),
    ]
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        for extra, want in cases:
            r = gw.http.post(path, json={"model": MODEL, **body, "max_tokens": 3, "temperature": 0, **extra})
            assert r.status_code == 200, (extra, r.text)
            p = last_params(gw)
            got = {k: p[k] for k in ("json_schema", "regex", "ebnf") if p[k] is not None}
            if "json_schema" in got:
                got["json_schema"] = json.loads(got["json_schema"]) if want["json_schema"] is not JSON_OBJECT else got["json_schema"]
            assert got == want, (path, extra)
    for choice, names in (("required", ["get_weather", "get_time"]), ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])):
        r = gw.chat(messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=3)
        assert r.status_code == 200, r.text
        schema = json.loads(last_params(gw)["json_schema"])
        branches = schema.get("anyOf", [schema])
        assert [b["properties"]["name"]["const"] for b in branches] == names
    for choice in ("auto", "none", None):
        assert gw.chat(messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=2).status_code == 200
        assert last_params(gw)["json_schema"] is None


# ---- errors --------------------------------------------------------------------------------------
BAD = [  # (endpoint, extra body, param)
    ("c", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}}, "response_format"),
    ("h", {"response_format": {"type": "json_schema", "json_schema": 5}}, "response_format"),
    ("c", {"response_format": {}}, "response_format"),
    ("c", {"regex": "a("}, "regex"),
    ("h", {"regex": "(?<=a)b"}, "regex"),
    ("c", {"regex": 5}, "regex"),
    ("c", {"ebnf": "root ::= foo"}, "ebnf"),
    ("h", {"ebnf": "garbage"}, "ebnf"),
    ("h", {"ebnf": ["x"]}, "ebnf"),
    ("c", {"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
    ("h", {"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
    ("h", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("h", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("h", {"tools": TOOLS, "tool_choice": 5}, "tool_choice"),
    ("h", {"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ("h", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice"),
    ("h", {"tool_choice": "required"}, "tool_choice"),
    ("h", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ("h", {"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ("h", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ("h", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ("h", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}], "tool_choice": "required"}, "tools"),
    ("h", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ("h", {"messages": [{"role": "assistant", "content": None, "tool_calls": [5]}]}, "messages"),
    ("h", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]}, "messages"),
    ("h", {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages"),
]


@pytest.mark.parametrize("kind,extra,param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_constraints_are_400(gw: Gateway, kind: str, extra: dict[str, Any], param: str) -> None:
    before = len(gw.fake.generates())
    body = {"prompt": "hi"} if kind == "c" else {"messages": CHAT}
    r = gw.http.post("/v1/completions" if kind == "c" else "/v1/chat/completions",
                     json={"model": MODEL, **body, "max_tokens": 2, **extra})
    err = assert_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    assert "/project/cpp" not in err["message"]  # xgrammar's source locations are cut
    assert len(gw.fake.generates()) == before  # refused before anything was queued


def test_bad_schema_message_names_the_problem(gw: Gateway) -> None:
    schema = {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}}
    err = assert_error(gw.chat(messages=CHAT, max_tokens=2, response_format={"type": "json_schema", "json_schema": schema}), 400, "response_format")
    assert "invalid JSON schema" in err["message"] and "minimum greater than maximum" in err["message"]
    # Cached: the same schema again is the same 400.
    assert assert_error(gw.chat(messages=CHAT, max_tokens=2, response_format={"type": "json_schema", "json_schema": schema}),
                        400, "response_format")["message"] == err["message"]


# ---- tool calls through the gateway ----------------------------------------------------------------
def test_auto_tool_call(gw: Gateway) -> None:
    gw.fake.scripts = [ids(gw, f"Checking.<tool_call>\n{CALL}\n</tool_call>")]
    r = gw.chat(messages=CHAT, tools=TOOLS, max_tokens=200)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    # "none": no parsing, the text as it came.
    gw.fake.scripts = [ids(gw, f"<tool_call>{CALL}</tool_call>")]
    (choice,) = gw.chat(messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=200).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": f"<tool_call>{CALL}</tool_call>"}
    assert choice["finish_reason"] == "length"


def test_auto_tool_call_n2_and_openai_client(gw: Gateway) -> None:
    gw.fake.scripts = [ids(gw, "plain answer"), ids(gw, f"<tool_call>{CALL}</tool_call>")]
    r = gw.client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, n=2, max_tokens=200)
    by_index = {c.index: c for c in r.choices}
    assert by_index[0].message.content == "plain answer" and by_index[0].message.tool_calls is None
    assert by_index[1].finish_reason == "tool_calls" and by_index[1].message.content is None
    assert by_index[1].message.tool_calls[0].function.name == "get_weather"


def stream_calls(events: list[Any]) -> dict[int, dict[str, Any]]:
    """Per choice: content, tool calls assembled from their deltas as a client does, finish."""
    out: dict[int, dict[str, Any]] = {}
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        for ch in e["choices"]:
            o = out.setdefault(ch["index"], {"content": "", "calls": {}, "finish": None})
            d = ch["delta"]
            o["content"] += d.get("content") or ""
            for tc in d.get("tool_calls", []):
                call = o["calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                if "id" in tc:
                    assert call["id"] is None, "id only in the first delta of a call"
                    call["id"], call["name"] = tc["id"], tc["function"]["name"]
                call["arguments"] += tc["function"].get("arguments", "")
            if ch["finish_reason"]:
                o["finish"] = ch["finish_reason"]
    return out


def test_auto_tool_call_stream_deltas(gw: Gateway) -> None:
    other = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    gw.fake.scripts = [ids(gw, f"Ok <tool_call>{CALL}</tool_call><tool_call>{other}</tool_call>")]
    events = gw.sse("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "max_tokens": 200, "stream": True})
    assert events[-1] == "[DONE]"
    (o,) = stream_calls(events).values()
    assert o["content"] == "Ok " and o["finish"] == "tool_calls"
    assert [o["calls"][i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert json.loads(o["calls"][1]["arguments"]) == {"tz": "UTC"}
    assert all(c["id"].startswith("call_") for c in o["calls"].values())
    assert not any("<tool_call>" in (ch["delta"].get("content") or "") for e in events[:-1] for ch in e["choices"])


@needs_grammars
def test_forced_tool_call(gw: Gateway) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    gw.fake.scripts = [ids(gw, CALL)]
    r = gw.chat(messages=CHAT, tools=TOOLS, tool_choice=named, max_tokens=200)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    # Streaming with n=2: nothing before the JSON is complete, then name, arguments, finish.
    gw.fake.scripts = [ids(gw, CALL), ids(gw, CALL[:30])]
    events = gw.sse("/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "n": 2,
                                            "max_tokens": 200, "stream": True})
    out = stream_calls(events)
    assert out[0]["finish"] == "tool_calls" and out[0]["content"] == ""
    assert json.loads(out[0]["calls"][0]["arguments"]) == {"city": "Paris", "days": 2}
    # The other choice ran out of tokens mid-JSON: its text, finish_reason "length".
    assert out[1] == {"content": CALL[:30], "calls": {}, "finish": "length"}
