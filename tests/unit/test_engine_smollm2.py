"""SmolLM2-135M-Instruct (real weights, fp32): the engine's greedy tokens equal
transformers' on one batch of mixed-length prompts, two of them sharing a long prefix."""
from __future__ import annotations

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.weights import reference_hf_model
from tests.unit.test_engine import PROMPTS, SHARED, hf_greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smol_hf(smollm2_dir: str) -> torch.nn.Module:
    return reference_hf_model(smollm2_dir, torch.float32)


@pytest.fixture(scope="module")
def smol_refs(smollm2_dir: str, smol_hf: torch.nn.Module) -> tuple[list[list[int]], list[tuple[list[int], list[float]]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    prompts += [tok(SHARED + "What is the answer?")["input_ids"], tok(SHARED + "Why is that so?")["input_ids"]]
    return prompts, [hf_greedy(smol_hf, ids, NEW_TOKENS) for ids in prompts]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_smollm2_batch_matches_transformers(smollm2_dir: str, smol_refs: tuple, chunked: bool) -> None:
    prompts, refs = smol_refs
    engine = Engine(smollm2_dir, device="cpu", dtype="float32", chunked_prefill=chunked, max_batch_tokens=32 if chunked else 4096)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    results = engine.generate(prompts, params)
    for ids, r, (ref, ref_lp) in zip(prompts, results, refs):
        assert r.token_ids == ref, f"prompt {ids[:8]}..."
        assert [lp.logprob for lp in r.logprobs] == pytest.approx(ref_lp, abs=1e-3)
    # A later request sharing the long prefix is served from the cache, same output.
    again = engine.generate([prompts[-1]], params)[0]
    assert again.cached_tokens > 0
    assert again.token_ids == refs[-1][0]
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_default_model_chat(smollm2_dir: str) -> None:
    engine = Engine(smollm2_dir, device="cpu", dtype="float32")
    r = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert "Paris" in r.text
    assert r.finish_reason == "stop"
    engine.shutdown()
