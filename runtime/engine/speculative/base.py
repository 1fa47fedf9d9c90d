"""The drafter seam (the policy that decides how many tokens to draft is policy.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from runtime.engine.draft_tree import DeviceDrafts, DraftTree
from runtime.engine.request import Req

__all__ = ["Drafter", "DraftTree"]


class Drafter(ABC):
    name = "abstract"
    # Whether observe() reads the target's hidden states; the engine builds the per-request
    # views of them (a few us each, per request and step) only for drafters that do.
    reads_hidden = True

    @abstractmethod
    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int] | DraftTree]:
        """Draft tokens per decoding request (fewer or none is fine): a chain of up to k
        tokens expected after req.all_ids, or a DraftTree of at most `max_tree_nodes`
        nodes and depth at most k."""

    def observe(self, req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        """After a forward: `accepted` tokens were appended to req (the bonus token last);
        hidden [len(accepted), H] holds the target's final hidden states of the rows that
        produced them. Stateful drafters update here."""

    def continue_after_verify(self, reqs: list[Req], drafts: DeviceDrafts, best: torch.Tensor,
                              hidden: torch.Tensor) -> bool:
        """Called after a greedy verify step of drafts this drafter left on the device (every
        request verified all of row i of `drafts`), before the host reads its result: a
        drafter may queue its next drafts now (see EagleDrafter). Returns whether it did."""
        return False

    def release(self, req: Req) -> None:
        """req finished or was retracted: drop any per-request state."""

    # Drafters that read the target's hidden states of prompt positions set this; the
    # engine then calls observe_prompt for every prefill chunk.
    wants_prompt_hidden = False

    def observe_prompt(self, req: Req, start: int, hidden: torch.Tensor) -> None:
        """After a prefill chunk: hidden [q_len, H] holds the target's final hidden states
        f_p for prompt positions start .. start+q_len-1 (f_p scores token p+1). Called
        before observe() sees the first generated token."""
