"""The calls a program appends to its state: `gen`, `select` and the role blocks."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.common.sampling_params import SamplingParams


class _Concat:
    """`"Q: " + gen("a") + "\n"`: calls joined with text, appended in order."""

    def __add__(self, other: Any) -> Seq:
        return Seq(_items(self) + _items(other))

    def __radd__(self, other: Any) -> Seq:
        return Seq(_items(other) + _items(self))


def _items(x: Any) -> list[Any]:
    if isinstance(x, Seq):
        return list(x.items)
    if isinstance(x, (str, _Concat)):
        return [x]
    raise TypeError(f"only text, gen(...), select(...) and role blocks join with + (got {type(x).__name__})")


@dataclass
class Seq(_Concat):
    items: list[Any]


@dataclass
class Gen(_Concat):
    """Generate text into `name`. Greedy unless a temperature is given. `regex` /
    `json_schema` constrain it (the engine's grammar decoding); when the output cannot meet
    them within max_tokens, the program raises a ProgramError naming this call."""

    name: str | None
    max_tokens: int = 128
    stop: str | list[str] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ignore_eos: bool = False

    @property
    def label(self) -> str:
        return f"gen {self.name!r}" if self.name else "gen"

    @property
    def schema_text(self) -> str | None:
        if self.json_schema is None or isinstance(self.json_schema, str):
            return self.json_schema
        return json.dumps(self.json_schema)

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=list([self.stop] if isinstance(self.stop, str) else self.stop or []),
            regex=self.regex, json_schema=self.schema_text, ignore_eos=self.ignore_eos,
        )


@dataclass
class Select(_Concat):
    """Append the choice the model finds likeliest after the state's text, by mean token
    logprob (runtime/common/continuations.py: length-normalised, so a longer choice is not
    penalised for its length), and store it in `name`."""

    name: str | None
    choices: list[str]

    def __post_init__(self) -> None:
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"select {self.name!r}: choices must be non-empty strings (got {self.choices!r})")

    @property
    def label(self) -> str:
        return f"select {self.name!r}" if self.name else "select"


Item = str | Gen | Select | Seq


@dataclass
class Role(_Concat):
    """A chat message of `role` whose content is the items, rendered through the model's
    chat template (runtime/lang/chat.py)."""

    role: str
    items: list[Item] = field(default_factory=list)


def gen(name: str | None = None, max_tokens: int = 128, stop: str | list[str] | None = None,
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = -1, seed: int | None = None,
        regex: str | None = None, json_schema: str | dict[str, Any] | None = None, ignore_eos: bool = False) -> Gen:
    g = Gen(name, max_tokens, stop, temperature, top_p, top_k, seed, regex, json_schema, ignore_eos)
    g.params()  # bad values fail here, where the program is written, not in a worker thread
    return g


def select(name: str | None = None, choices: Sequence[str] = ()) -> Select:
    return Select(name, list(choices))


def _role(role: str, items: tuple[Item, ...]) -> Role:
    for it in items:
        if not isinstance(it, (str, Gen, Select, Seq)):
            raise TypeError(f"{role}(...) takes text, gen(...) and select(...) (got {type(it).__name__})")
    return Role(role, list(items))


def system(*items: Item) -> Role:
    return _role("system", items)


def user(*items: Item) -> Role:
    return _role("user", items)


def assistant(*items: Item) -> Role:
    return _role("assistant", items)
