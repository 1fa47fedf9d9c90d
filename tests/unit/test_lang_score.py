"""Scoring continuations (`Engine.score`, what `select` ranks by): logprobs equal to
transformers' fp32 ones, the prompt's KV shared through the prefix cache, the boundary
split of runtime/common/continuations.py, and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
import transformers

from runtime import Engine
from runtime.common.continuations import split_continuations

PROMPT = "Paris is the capital of France. Berlin is the capital of"
CHOICES = [" Germany.", " France", " the lazy dog"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str):
    e = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    yield e
    e.shutdown()


def hf_logprobs(model_dir: str, ids: list[int], start: int) -> list[float]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[p - 1, ids[p]].item() for p in range(start, len(ids))]


def test_score_matches_transformers_and_shares_the_prompt(engine: Engine, tiny_model_dir: str) -> None:
    scores = engine.score(PROMPT, CHOICES)
    n_prompt = len(engine.tokenizer(PROMPT)["input_ids"])
    for choice, s in zip(CHOICES, scores):
        ids = engine.tokenizer(PROMPT + choice)["input_ids"]
        assert s.token_ids == ids[len(ids) - len(s.token_ids):]
        ref = hf_logprobs(tiny_model_dir, ids, len(ids) - len(s.token_ids))
        assert s.logprobs == pytest.approx(ref, abs=1e-4)
        assert s.mean_logprob == pytest.approx(sum(ref) / len(ref), abs=1e-4)
        # Every choice found the prompt's full pages (page_size 4) in the prefix cache.
        assert s.cached_tokens == (n_prompt - 1) // 4 * 4


def test_split_moves_left_when_a_choice_merges_with_the_prompt(engine: Engine) -> None:
    enc = lambda t: engine.tokenizer(t)["input_ids"]  # noqa: E731
    # A prompt ending in a space: " capital" is one token in "the capital", so the space is
    # scored as part of every choice, and the context is the same for all of them.
    prompt, choices = "Berlin is the ", ["capital", "lazy"]
    ctx, conts = split_continuations(enc, prompt, choices)
    assert len(ctx) == len(enc(prompt)) - 1
    assert conts[0] == enc(" capital")
    assert all(ctx + c == enc(prompt + ch) for c, ch in zip(conts, choices))


def test_score_errors(engine: Engine) -> None:
    with pytest.raises(ValueError, match="continuation 0 is empty"):
        engine.score(PROMPT, [""])
    with pytest.raises(ValueError, match="must not be empty"):
        engine.score(PROMPT, [])
    with pytest.raises(ValueError, match="text prompt takes text"):
        engine.score(PROMPT, [[1, 2]])
