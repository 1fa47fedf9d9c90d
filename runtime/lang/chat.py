"""Role blocks through the model's chat template. The template renders whole messages, but
a program writes a message piece by piece (`assistant(gen(...))` generates inside it), so
each role's opening and closing text is found by rendering the conversation so far plus a
message holding a sentinel: the text before the sentinel (past the conversation so far)
opens the message, the text after it closes it. This keeps what the template adds around
a message (a default system prompt, the generation prompt's exact form) in the program's
text, and the program's text equal to what chat/completions would have sent."""
from __future__ import annotations

import json
from collections.abc import Callable

SENTINEL = "\u2063runtime-lang-content\u2063"

Render = Callable[[list[dict[str, str]]], str]  # messages -> the template's text (no generation prompt)


class RoleRenderer:
    def __init__(self, render: Render) -> None:
        self.render = render
        self._cache: dict[str, tuple[str, str]] = {}

    def open_close(self, messages: list[dict[str, str]], role: str) -> tuple[str, str]:
        """(text that opens a `role` message after `messages`, text that closes it)."""
        key = json.dumps([messages, role])
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        full = self.render(messages + [{"role": role, "content": SENTINEL}])
        at = full.find(SENTINEL)
        if at < 0:
            raise ValueError(f"the chat template drops the content of {role} messages")
        before = self.render(messages) if messages else ""
        common = 0
        while common < min(len(before), at) and before[common] == full[common]:
            common += 1
        out = (full[common:at], full[at + len(SENTINEL):])
        if len(self._cache) < 4096:
            self._cache[key] = out
        return out
