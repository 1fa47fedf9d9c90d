"""Per-request sampling settings (the names and meanings of the OpenAI API)."""
from __future__ import annotations

from dataclasses import dataclass, field

# The grammar fields (at most one per request), in the order they are checked.
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    presence_penalty: float = 0.0  # OpenAI: on generated tokens, additive
    frequency_penalty: float = 0.0  # OpenAI: on generated tokens, additive per occurrence
    repetition_penalty: float = 1.0  # HF/CTRL: on prompt + generated tokens, multiplicative
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob plus top k
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    skip_special_tokens: bool = True
    # Grammar-constrained decoding (runtime/engine/grammar.py), at most one: a JSON Schema as
    # JSON text (OpenAI's json_object is '{"type": "object"}'), a regex, or xgrammar EBNF.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # Scoring (`Engine.score`, `select` of runtime.lang, POST /v1/score): when set, prefill also
    # returns the logprob of every prompt token at positions >= this one, given the tokens
    # before it (Req.prompt_logprobs). The prefix cache then serves at most the tokens
    # before position - 1, so the logits that predict those tokens are computed.
    prompt_logprobs_start: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with the offending field named (`param`), as the API reports it."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1 (off) or non-negative"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be positive"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("min_tokens", 0 <= self.min_tokens, "must be non-negative"),
            ("n", self.n >= 1, "must be at least 1"),
            ("prompt_logprobs_start", self.prompt_logprobs_start is None or self.prompt_logprobs_start >= 1,
             "must be at least 1 (the first token has no logprob)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamError(name, f"{name} {why} (got {getattr(self, name)!r})")
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in given:
            if not isinstance(getattr(self, name), str):
                raise SamplingParamError(name, f"{name} must be a string (got {type(getattr(self, name)).__name__})")
        if len(given) > 1:
            raise SamplingParamError(given[1], f"at most one of json_schema, regex and ebnf may be set (got {', '.join(given)})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingParamError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
