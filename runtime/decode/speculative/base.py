"""The drafter seam and the policy that decides how many tokens to draft."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from runtime.engine.draft_tree import DraftTree
from runtime.engine.request import Req

__all__ = ["Drafter", "DraftTree", "SpeculationPolicy"]


class Drafter(ABC):
    name = "abstract"

    @abstractmethod
    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int] | DraftTree]:
        """Draft tokens per decoding request (fewer or none is fine): a chain of up to k
        tokens expected after req.all_ids, or a DraftTree of at most `max_tree_nodes`
        nodes and depth at most k."""

    def observe(self, req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        """After a forward: `accepted` tokens were appended to req (the bonus token last);
        hidden [len(accepted), H] holds the target's final hidden states of the rows that
        produced them. Stateful drafters update here."""

    def release(self, req: Req) -> None:
        """req finished or was retracted: drop any per-request state."""

    # Drafters that read the target's hidden states of prompt positions set this; the
    # engine then calls observe_prompt for every prefill chunk.
    wants_prompt_hidden = False

    def observe_prompt(self, req: Req, start: int, hidden: torch.Tensor) -> None:
        """After a prefill chunk: hidden [q_len, H] holds the target's final hidden states
        f_p for prompt positions start .. start+q_len-1 (f_p scores token p+1). Called
        before observe() sees the first generated token."""


class SpeculationPolicy:
    """How many tokens to draft this step. Verification costs a forward over k+1 rows per
    request; at large batches the step is compute-bound and the extra rows cost more than
    the accepted tokens save, so drafting shrinks and then stops. `adaptive` also lowers k
    when recent acceptance is poor."""

    def __init__(self, k: int, mode: str = "adaptive", max_batch: int = 32) -> None:
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"speculative policy must be fixed or adaptive (got {mode!r})")
        self.k = k
        self.mode = mode
        self.max_batch = max_batch
        self.accept_rate = 1.0  # EMA of accepted drafts / proposed drafts

    def num_draft_tokens(self, batch_size: int) -> int:
        if self.mode == "fixed":
            return self.k
        if batch_size > self.max_batch:
            return 0
        k = self.k if batch_size <= self.max_batch // 2 else max(1, self.k // 2)
        if self.accept_rate < 0.2:
            k = min(k, 1)
        return k

    def record(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.accept_rate = 0.9 * self.accept_rate + 0.1 * (accepted / proposed)
