"""train-draft's serving accept length: greedy serving drafts only where a step begins
(first generated pair, then p + a(p), ...), so its mean differs from the per-position one."""
from __future__ import annotations

import torch

from runtime.decode.speculative.train_draft import serving_walk


def test_walk_follows_steps_not_positions() -> None:
    # Row 0 from pair 0: steps at 0 (+3), 3 (+2), 5 (+1); pair 6 has no score: 3 steps, 6 tokens.
    # Row 1 from pair 2 (the 9s are prompt pairs, never drafted from): steps at 2 (+2), 4, 5, 6,
    # each +1, then pair 7 is unscored: 4 steps, 5 tokens.
    # Row 2 from pair 1: a step at 1 (+5) jumps past the last scored pair (5): 1 step, 5 tokens.
    acc = torch.tensor([[3, 1, 1, 2, 6, 1, 0, 0],
                        [9, 9, 2, 6, 1, 1, 1, 0],
                        [0, 5, 1, 1, 1, 1, 0, 0]])
    first = torch.tensor([0, 2, 1])
    tokens, steps = serving_walk(acc, first)
    assert (tokens, steps) == (16, 8)
    # The per-position mean over the generated pairs is 34 / 16: the walk skips the 6s.
    generated = (torch.arange(8)[None, :] >= first[:, None]) & (acc > 0)
    assert acc[generated].sum().item() / generated.sum().item() == 34 / 16 != tokens / steps


def test_walk_ends_at_the_row_end_and_skips_unscored_rows() -> None:
    # The last step lands exactly on the row end; a row whose first pair has no score
    # (too few generated tokens for k drafts) takes no step.
    acc = torch.tensor([[2, 1, 3, 7, 7], [0, 0, 0, 0, 0]])
    assert serving_walk(acc, torch.tensor([0, 1])) == (5, 2)
