"""What a program needs of a model: generate (streaming text), score continuations, cache
a prefix (before a fork), and render chat messages. Thread-safe: a program's forks and a
run_batch's programs call it from several threads at once."""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.common.continuations import ContinuationScore
from runtime.common.sampling_params import SamplingParams

OnText = Callable[[str], None]


@dataclass
class GenOutput:
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    completion_tokens: int
    meta: dict = field(default_factory=dict)


class BackendError(RuntimeError):
    """The backend failed a call (a server error, an engine step out of memory)."""


class Backend(ABC):
    @abstractmethod
    def generate(self, prompt: str, params: SamplingParams, on_text: OnText | None = None,
                 cancel: threading.Event | None = None) -> GenOutput:
        """Generate after `prompt`, calling on_text with each piece of text as it comes.
        When `cancel` is set, the request is aborted and the call returns (finish "abort")."""

    @abstractmethod
    def score(self, prompt: str, continuations: list[str]) -> list[ContinuationScore]:
        """Per-token logprobs of each continuation after the prompt, the continuations in
        one batched prefill over the prompt's shared KV."""

    @abstractmethod
    def cache_prefix(self, prompt: str) -> None:
        """Compute `prompt` once so that requests starting with it (a fork's branches) find
        its KV in the prefix cache."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to `messages` (no generation prompt)."""

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
