"""Structured output at the gateway: the request's one constraint (response_format, regex,
ebnf, or a tool call forced by tool_choice) as the SamplingParams field the engine compiles
(`json_schema`, `regex`, `ebnf`), checked with xgrammar here first, so a bad schema is a 400
before anything is queued. Checks are cached by (kind, text) and run on the tokenising pool.

`strict` in a json_schema response_format: OpenAI's strict mode requires
`additionalProperties: false` on every object; with strict true, the gateway adds it to each
object schema that does not say otherwise, so the schema the engine compiles says what the
client will get. Without strict the schema goes as given (xgrammar still generates only the
listed properties unless the schema allows others, so the output validates either way)."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
import sys
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from runtime.common.sampling_params import SamplingParams
from runtime.tokenizer.protocol import APIError

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")
# Whether the engine's SamplingParams has the grammar fields (the engine side of issue 15).
ENGINE_HAS_GRAMMARS = set(GRAMMAR_FIELDS) <= {f.name for f in dataclasses.fields(SamplingParams)}
JSON_OBJECT = '{"type": "object"}'
MAX_GRAMMAR_CHARS = 1_000_000  # a schema, regex or grammar larger than this is refused
CACHE_SIZE = 1024
INLINE_CHARS = 256  # checked on the event loop below this size (microseconds of work)

# xgrammar's errors start with a timestamp and a C++ source location: "[18:49:38] /x/y.cc:94: "
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_COMPILE_FAILED = "Check failed: (error.empty()) is false: "


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_schema" | "regex" | "ebnf": the SamplingParams field
    text: str  # the schema as JSON text, the regex, or the EBNF grammar
    param: str  # the request field a 400 names


def _strict_schema(schema: Any) -> Any:
    """A copy of `schema` with additionalProperties false on every object schema that does not
    set it (OpenAI's strict mode), walking every subschema keyword."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        s = stack.pop()
        if isinstance(s, list):
            stack.extend(s)
            continue
        if not isinstance(s, dict):
            continue
        is_object = s.get("type") == "object" or (isinstance(s.get("type"), list) and "object" in s["type"]) or "properties" in s
        if is_object and "additionalProperties" not in s:
            s["additionalProperties"] = False
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(s.get(key), dict):
                stack.extend(s[key].values())
        for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "contains"):
            if key in s:
                stack.append(s[key])
    return schema


def schema_text(schema: Any, param: str) -> str:
    try:
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:  # JSON from the request always dumps; be safe anyway
        raise APIError(400, f"the schema is not JSON: {e}", param) from None


def request_constraint(req: Any) -> Constraint | None:
    """The one constraint a completions or chat request asks for through response_format,
    regex or ebnf; more than one is a 400 naming them."""
    found: list[Constraint] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Constraint("json_schema", JSON_OBJECT, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema object "
                           "({\"name\": ..., \"schema\": {...}})", "response_format")
        schema = rf.json_schema.schema_
        if schema is None:
            schema = {}  # OpenAI: an absent schema allows any JSON value
        if rf.json_schema.strict:
            schema = _strict_schema(schema)
        found.append(Constraint("json_schema", schema_text(schema, "response_format"), "response_format"))
    if req.regex is not None:
        found.append(Constraint("regex", req.regex, "regex"))
    if req.ebnf is not None:
        found.append(Constraint("ebnf", req.ebnf, "ebnf"))
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise APIError(400, f"at most one of response_format (json_object / json_schema), regex and ebnf may be set "
                       f"(got {names})", found[1].param)
    return found[0] if found else None


def _clean(message: str) -> str:
    first = _XGR_PREFIX.sub("", message.strip().splitlines()[0] if message.strip() else message)
    return first.replace(_COMPILE_FAILED, "").strip() or "it does not compile"


class GrammarChecker:
    """Compiles each distinct constraint with xgrammar once (without a tokenizer: syntax and
    schema support, what a client can get wrong) and remembers the verdict."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    @staticmethod
    def warm(pool: Executor) -> None:
        """Import xgrammar on `pool` now (0.5-1.3 s on a 2-core machine), so that the first
        constrained request neither pays for it nor stalls the event loop with it."""
        pool.submit(importlib.import_module, "xgrammar")

    def cached(self, c: Constraint) -> bool:
        return (c.kind, c.text) in self._cache

    def inline(self, c: Constraint) -> bool:
        """Whether checking `c` takes microseconds (cached, or small with xgrammar imported)."""
        return self.cached(c) or (len(c.text) <= INLINE_CHARS and "xgrammar" in sys.modules)

    def error(self, c: Constraint) -> str | None:
        """None when `c` compiles, else why not (thread-safe enough: a race compiles twice)."""
        key = (c.kind, c.text)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        why = self._compile(c)
        self._cache[key] = why
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return why

    @staticmethod
    def _compile(c: Constraint) -> str | None:
        import xgrammar  # warm() imports it at start, off the event loop

        if len(c.text) > MAX_GRAMMAR_CHARS:
            return f"it is longer than {MAX_GRAMMAR_CHARS} characters"
        try:
            if c.kind == "json_schema":
                if not isinstance(json.loads(c.text), (dict, bool)):
                    return "a JSON schema must be an object"
                xgrammar.Grammar.from_json_schema(c.text)
            elif c.kind == "regex":
                xgrammar.Grammar.from_regex(c.text)
            else:
                xgrammar.Grammar.from_ebnf(c.text)
        except Exception as e:  # xgrammar raises RuntimeError (C++), ValueError, ...
            return _clean(str(e))
        return None

    def check(self, c: Constraint, what: str | None = None) -> None:
        why = self.error(c)
        if why is not None:
            name = what or {"json_schema": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar"}[c.kind]
            raise APIError(400, f"invalid {name} in {c.param}: {why}", c.param)


def with_constraint(params: SamplingParams, c: Constraint | None) -> SamplingParams:
    """`params` constrained by `c` (unchanged for None)."""
    if c is None:
        return params
    if not ENGINE_HAS_GRAMMARS:
        raise APIError(400, "structured output (response_format, regex, ebnf, forced tool calls) is not supported "
                       "by this engine build", c.param)
    return dataclasses.replace(params, **{c.kind: c.text})
