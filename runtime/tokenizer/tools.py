"""OpenAI tool calls on chat completions: the tools and tool turns rendered into the prompt,
the JSON schema a forced call ("required", a named function) is decoded under, and the
parsers that turn the output into `message.tool_calls` (whole, or as stream deltas).

The format is Hermes/Qwen's: a call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
A chat template that handles tools itself (it mentions `tools`, as Qwen's and Hermes' do)
gets them through `apply_chat_template(tools=...)`. One that does not (SmolLM2's ChatML)
gets them rendered here, Hermes-style: the tools listed in the system message with the
instruction to answer in `<tool_call>` blocks, an assistant's earlier calls as such blocks,
and tool results as a `tool` turn holding `<tool_response>...</tool_response>`."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.tokenizer.protocol import APIError, ChatCompletionRequest, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools:\n"
    "<tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call object; `arguments` becomes JSON text."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


# ---- the request -------------------------------------------------------------------------------
def check_tools(req: ChatCompletionRequest) -> list[Tool]:
    """The request's tools, checked: names as OpenAI allows, no duplicates, parameters an
    object schema; tool_choice naming a function in them. Returns [] without tools."""
    tools = req.tools or []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        name = t.function.name
        if not NAME_RE.match(name):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-' (got {name!r})", "tools")
        if name in seen:
            raise APIError(400, f"tools[{i}].function.name {name!r} appears twice", "tools")
        seen.add(name)
    choice = req.tool_choice
    if choice in ("required",) or (choice is not None and not isinstance(choice, str)):
        if not tools:
            raise APIError(400, "tool_choice 'required' or a named function needs tools", "tool_choice")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in seen:
        raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                       f"({', '.join(sorted(seen))})", "tool_choice")
    return tools


def tool_mode(req: ChatCompletionRequest) -> str:
    """"off" (no tools), "none", "auto", "required" or "named"."""
    if not req.tools:
        return "off"
    choice = req.tool_choice
    if choice is None:
        return "auto"  # OpenAI's default with tools
    return choice if isinstance(choice, str) else "named"


def call_schema(tools: list[Tool], name: str | None) -> dict[str, Any]:
    """The schema of one call `{"name": ..., "arguments": {...}}`: to the named function, or
    to any of `tools` (anyOf, one branch per tool, so arguments follow the chosen name)."""

    def one(t: Tool) -> dict[str, Any]:
        params = t.function.parameters if t.function.parameters is not None else EMPTY_PARAMETERS
        return {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if name is not None:
        return one(next(t for t in tools if t.function.name == name))
    return {"anyOf": [one(t) for t in tools]}


# ---- the prompt --------------------------------------------------------------------------------
def template_handles_tools(template: Any) -> bool:
    return isinstance(template, str) and "tools" in template


def _tool_json(t: Tool) -> dict[str, Any]:
    return {"type": "function", "function": t.function.model_dump(exclude_none=True)}


def _check_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as OpenAI sends them, checked (400 otherwise)."""
    bad = APIError(400, f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", "
                   "\"function\": {\"name\": str, \"arguments\": str}}", "messages")
    if not isinstance(calls, list):
        raise bad
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments", "{}"), (str, dict))
                or not isinstance(c.get("id", ""), str) or c.get("type", "function") != "function"):
            raise bad
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass  # the model's own malformed arguments: rendered as they were
        out.append({"id": c.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def render_messages(messages: list[dict[str, Any]], tools: list[Tool], native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for apply_chat_template. `native`: the template renders tools and
    tool turns itself (arguments given as objects, as such templates expect); otherwise they
    become plain text turns here (Hermes-style)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.pop("tool_calls", None)
        calls = _check_calls(calls, i) if calls is not None else []
        if "tool_call_id" in m and not isinstance(m["tool_call_id"], str):
            raise APIError(400, f"messages[{i}].tool_call_id must be a string", "messages")
        if native:
            if calls:
                m["tool_calls"] = calls
            out.append(m)
            continue
        if calls:
            blocks = [f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n{CLOSE}"
                      for c in calls]
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        if m.get("role") == "tool" and isinstance(m.get("content"), str):
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        out.append(m)
    if not tools:
        return out, None
    if native:
        return out, [_tool_json(t) for t in tools]
    listing = "\n".join(json.dumps(_tool_json(t), ensure_ascii=False) for t in tools)
    system = SYSTEM_PROMPT.format(tools=listing)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


# ---- the output --------------------------------------------------------------------------------
def _parse_call(body: str) -> dict[str, Any] | None:
    """A tool call from a block's JSON `{"name": str, "arguments": object}`, else None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return tool_call(obj["name"], args)


def parse_forced(text: str) -> dict[str, Any] | None:
    """The tool call a forced decode produced (its whole output is the call's JSON)."""
    return _parse_call(text.strip())


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) from output that may hold `<tool_call>` blocks. Blocks that do
    not parse, and an unclosed block, stay in the content as text. Content is the text
    outside the calls, stripped, or None when nothing is left."""
    p = ToolCallStream()
    content = p.feed(text) + p.flush()
    if not p.calls:
        return text, []
    content = content.strip()
    return content or None, p.calls


@dataclass
class ToolCallStream:
    """Streaming `<tool_call>` parser: `feed` returns the text that is surely content; text
    from a possible `<tool_call>` on is held until its block closes (then it becomes a call
    in `calls`, or content if it does not parse) or until `flush` at the end."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    _held: str = ""
    _new: int = 0  # calls[_new:] not yet taken by take_calls

    def feed(self, text: str) -> str:
        self._held += text
        out = []
        while True:
            start = self._held.find(OPEN)
            if start < 0:
                # Hold back a tail that could be the start of "<tool_call>".
                keep = next((k for k in range(min(len(OPEN) - 1, len(self._held)), 0, -1)
                             if OPEN.startswith(self._held[-k:])), 0)
                out.append(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                return "".join(out)
            end = self._held.find(CLOSE, start + len(OPEN))
            if end < 0:
                out.append(self._held[:start])
                self._held = self._held[start:]
                return "".join(out)
            out.append(self._held[:start])
            block = self._held[start: end + len(CLOSE)]
            self._held = self._held[end + len(CLOSE):]
            call = _parse_call(block[len(OPEN): -len(CLOSE)])
            if call is None:
                out.append(block)
            else:
                self.calls.append(call)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def take_calls(self) -> list[tuple[int, dict[str, Any]]]:
        """(index, call) for the calls completed since the last take."""
        new = list(enumerate(self.calls))[self._new:]
        self._new = len(self.calls)
        return new


def call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's streamed form of one call: id, type and name first, then the arguments."""
    fn = call["function"]
    return [
        {"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]},
    ]


FORCED = ("required", "named")


class ToolOutput:
    """One choice's output shaped by the tool mode: `message` for the whole answer,
    `stream` per update for the deltas. Forced calls are held until the output ends (the
    JSON is complete only then); "auto" holds text from `<tool_call>` to its close."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.parser = ToolCallStream() if mode == "auto" else None

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
        """(content, tool_calls, finish_reason) of the whole output."""
        if self.mode in FORCED:
            call = parse_forced(text)
            if call is not None:
                return None, [call], "tool_calls"
        elif self.mode == "auto":
            content, calls = parse_tool_calls(text)
            if calls:
                return content, calls, "tool_calls"
        return text, None, finish_reason

    def stream(self, text: str, whole: str, finished: bool, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """(deltas, finish_reason) for an update adding `text` (the output so far: `whole`)."""
        if self.mode in FORCED:
            if not finished:
                return [], finish_reason
            call = parse_forced(whole)
            if call is None:
                return ([{"content": whole}] if whole else []), finish_reason
            return call_deltas(0, call), "tool_calls"
        if self.parser is None:
            return ([{"content": text}] if text else []), finish_reason
        content = self.parser.feed(text)
        deltas = [{"content": content}] if content else []
        for index, call in self.parser.take_calls():
            deltas += call_deltas(index, call)
        if finished:
            rest = self.parser.flush()
            if rest:
                deltas.append({"content": rest})
            if self.parser.calls:
                finish_reason = "tool_calls"
        return deltas, finish_reason
