"""One sampled token's logprob and its top alternatives: what the engine computes, the wire
messages carry (runtime/messages.py) and the gateway renders."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first
