"""Scoring continuations of a prompt (`Engine.score`, POST /v1/score, `select`).

Tokenization at the boundary: each continuation is scored as the tokens it has in the
concatenated text `prompt + continuation`, because that is what the model would read (and
generate): a choice " Paris" after "is" is the token " Paris", not " " + "Paris". The
split is the longest prefix that every concatenation shares with the prompt's own
tokenization; when a choice merges with the prompt's last token (a prompt ending in a
space), the split moves left for every choice alike, so all choices are scored over the
same context and their scored tokens cover exactly `choice` plus the same prompt tail.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[str], list[int]]


@dataclass
class ContinuationScore:
    token_ids: list[int]  # the scored tokens (the continuation, as tokenized after the split)
    logprobs: list[float]  # per token: log p(token | everything before it)
    cached_tokens: int = 0  # prompt tokens the prefix cache served

    @property
    def logprob_sum(self) -> float:
        return sum(self.logprobs)

    @property
    def mean_logprob(self) -> float:
        """The length-normalised score `select` ranks by: the mean token logprob (the log of
        the per-token geometric mean probability), so long choices are not penalised for
        having more tokens."""
        return self.logprob_sum / len(self.logprobs)


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_continuations(encode: Encode, prompt: str | list[int], continuations: Sequence[str] | Sequence[list[int]]
                        ) -> tuple[list[int], list[list[int]]]:
    """(context ids, the scored ids of each continuation). Token-id input is taken as is."""
    if not continuations:
        raise ValueError("continuations must not be empty")
    if not isinstance(prompt, str):
        ctx, conts = list(prompt), [list(c) for c in continuations]  # type: ignore[arg-type]
        if not all(isinstance(c, list) for c in continuations):
            raise ValueError("token-id prompts take token-id continuations")
    else:
        if not all(isinstance(c, str) for c in continuations):
            raise ValueError("a text prompt takes text continuations")
        base = encode(prompt)
        fulls = [encode(prompt + c) for c in continuations]  # type: ignore[operator]
        split = min(common_prefix(base, f) for f in fulls)
        ctx, conts = base[:split], [f[split:] for f in fulls]
    if not ctx:
        raise ValueError("the prompt is empty: the first token has no logprob to score")
    for i, c in enumerate(conts):
        if not c:
            raise ValueError(f"continuation {i} is empty (no tokens after the prompt)")
    return ctx, conts
