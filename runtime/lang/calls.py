"""Running one call of a program on its state's thread: text, gen, select, role blocks."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from runtime.lang.backend.base import GenOutput
from runtime.lang.ir import Gen, Role, Select, Seq

if TYPE_CHECKING:
    from runtime.lang.state import ProgramState


class ProgramError(RuntimeError):
    """A call of a program failed; `call` names it ("gen 'answer'", "select 'tool'", "fork")."""

    def __init__(self, call: str, cause: BaseException | str) -> None:
        super().__init__(f"{call} failed: {cause}")
        self.call = call
        if isinstance(cause, BaseException):
            self.__cause__ = cause


def run_call(s: ProgramState, item: str | Gen | Select | Role | Seq) -> None:
    if isinstance(item, Seq):
        for it in item.items:
            run_call(s, it)
    elif isinstance(item, str):
        s._append(item)
    elif isinstance(item, Gen):
        _gen(s, item)
    elif isinstance(item, Select):
        _select(s, item)
    elif isinstance(item, Role):
        _role(s, item)
    else:
        raise TypeError(f"unknown call {type(item).__name__}")


def _gen(s: ProgramState, g: Gen) -> None:
    program = s.program
    try:
        out = program.backend.generate(s._text, g.params(), lambda piece: s._emit(piece, g.name), program.cancel)
    except Exception as e:
        raise ProgramError(g.label, e) from e
    if out.finish_reason == "abort":
        raise ProgramError(g.label, "aborted (the program was cancelled, or the server aborted the request)")
    unmet = _unmet_constraint(g, out)
    if unmet:
        raise ProgramError(g.label, unmet)
    s._append(out.text, emit=False)  # streamed piece by piece already
    if g.name:
        s._values[g.name] = out.text
        s._meta[g.name] = {"prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
                           "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason}


def _unmet_constraint(g: Gen, out: GenOutput) -> str | None:
    """Why a constrained gen's output does not meet its regex / schema, or None. The grammar
    ends a request where the output is complete; one cut at max_tokens usually is not."""
    if out.finish_reason != "length" or (g.regex is None and g.json_schema is None):
        return None
    if g.regex is not None:
        try:
            if re.fullmatch(g.regex, out.text):
                return None
        except re.error:
            pass  # xgrammar's regex dialect: trust the cut
        what = "regex"
    else:
        try:
            json.loads(out.text, strict=False)  # raw control characters in strings: see test_lang
            return None
        except ValueError:
            what = "json_schema"
    return (f"the output does not meet its {what} within max_tokens={g.max_tokens} "
            f"(got {out.text[:200]!r}); raise max_tokens or loosen the {what}")


def _select(s: ProgramState, sel: Select) -> None:
    try:
        scores = s.program.backend.score(s._text, sel.choices)
    except Exception as e:
        raise ProgramError(sel.label, e) from e
    means = [sc.mean_logprob for sc in scores]
    best = max(range(len(means)), key=means.__getitem__)  # the first of equal scores
    choice = sel.choices[best]
    s._append(choice, sel.name)
    if sel.name:
        s._values[sel.name] = choice
        meta: dict[str, Any] = {"mean_logprobs": means, "token_logprobs": [sc.logprobs for sc in scores],
                                "cached_tokens": [sc.cached_tokens for sc in scores]}
        s._meta[sel.name] = meta


def _role(s: ProgramState, r: Role) -> None:
    opening, closing = s.program.roles.open_close(s._messages, r.role)
    s._append(opening)
    start = len(s._text)
    for item in r.items:
        run_call(s, item)
    content = s._text[start:]
    s._append(closing)
    s._messages.append({"role": r.role, "content": content})
