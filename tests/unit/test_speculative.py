"""Speculation never changes the output: identical greedy tokens, the target's exact
distribution under sampling (chi-square), no page leaked by rejected drafts, stops inside
an accepted run end where they would without speculation."""
from __future__ import annotations

import itertools

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.config import EngineConfig
from runtime.decode.speculative.ngram import NgramDrafter
from runtime.engine.core import EngineCore
from runtime.engine.model import LlamaForCausalLM
from runtime.engine.model_config import ModelConfig
from runtime.engine.weights import LoadedModel
from tests.unit.test_engine import PROMPTS

COPY = "The cat sat on the mat. The cat sat on the mat. The cat sat on the"


@pytest.mark.parametrize("method", ["ngram"])
def test_greedy_identical_with_speculation(tiny_model_dir: str, method: str) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS + [COPY, COPY + " mat. The cat"]
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    ref = [r.token_ids for r in base.generate(prompts, params)]
    spec = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative=method,
                  num_draft_tokens=4, speculative_policy="fixed")
    got = spec.generate(prompts, params)
    assert [r.token_ids for r in got] == ref
    assert max(r.accept_length for r in got) > 1.0  # drafts were accepted somewhere
    assert spec.core.accept_samples and max(spec.core.accept_samples) > 1
    spec.shutdown()
    spec.core.pool.check_no_leak(0)


def test_stop_inside_accepted_run(tiny_model_dir: str) -> None:
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    spec = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="ngram", speculative_policy="fixed")
    free = base.generate([COPY], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop_tok = free.token_ids[len(free.token_ids) // 2]
    piece = free.text[len(free.text) // 2 :][:4]
    for p in (SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[piece]),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)):
        a, b = base.generate([COPY], p)[0], spec.generate([COPY], p)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    spec.shutdown()
    spec.core.pool.check_no_leak(0)


def test_rejected_drafts_leak_no_pages(tiny_model_dir: str) -> None:
    core = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=2, kv_cache_tokens=400).core
    gen = torch.Generator().manual_seed(0)
    for i, p in enumerate(PROMPTS):
        core.add_request(f"r{i}", core.loaded.tokenizer(p)["input_ids"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while core.has_work:
        drafts = {r.rid: torch.randint(0, 512, (5,), generator=gen).tolist() for r in core.scheduler.running}
        core.step(drafts)
    core.scheduler.check_no_leak()
    core.cache.reset()
    core.pool.check_no_leak(0)


def test_ngram_lookup() -> None:
    d = NgramDrafter(max_n=3)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert d.lookup([5, 6, 7], 2) == []
    assert d.lookup([1, 2, 1, 2, 1], 2) == [2, 1]  # the latest earlier match


# ---- sampling keeps the target's distribution ------------------------------------------------
V = 8
CHI2_CRIT_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def tiny_vocab_core() -> EngineCore:
    mc = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(3)
    model = LlamaForCausalLM(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    model.eval()
    loaded = LoadedModel(model=model, config=mc, hf_config=None, tokenizer=None, path="", name="tiny8")
    return EngineCore(EngineConfig(device="cpu", dtype="float32", page_size=2, prefix_cache=False), loaded=loaded)


def _dist(core: EngineCore, prompt: list[int]) -> torch.Tensor:
    req = core.add_request(f"d{len(core.requests)}-{prompt}", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=V))
    while not req.finished:
        core.step()
    top = dict(req.output_logprobs[0].top)
    return torch.tensor([top[t] for t in range(V)]).exp()


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("drafts", ["likely", "random"])
def test_sampling_distribution_preserved(tiny_vocab_core: EngineCore, drafts: str) -> None:
    core, prompt, n = tiny_vocab_core, [1, 2, 3, 1, 2], 3000
    p1 = _dist(core, prompt)
    p2 = {a: _dist(core, prompt + [a]) for a in range(V)}
    marg2 = sum(p1[a] * p2[a] for a in range(V))
    marg3 = sum(p1[a] * p2[a][b] * _dist(core, prompt + [a, b]) for a, b in itertools.product(range(V), range(V)))
    likely = [int(marg2.argmax()), int(marg3.argmax())]
    gen = torch.Generator().manual_seed(1)
    reqs = [core.add_request(f"s{drafts}{i}", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i)) for i in range(n)]
    while any(not r.finished for r in reqs):
        proposal = {r.rid: (likely if drafts == "likely" else torch.randint(0, V, (2,), generator=gen).tolist())
                    for r in reqs if r.output_ids and not r.finished}
        core.step(proposal)
    assert max(r.accept_length for r in reqs) > 1.0
    c2 = torch.bincount(torch.tensor([r.output_ids[1] for r in reqs]), minlength=V).float()
    c3 = torch.bincount(torch.tensor([r.output_ids[2] for r in reqs]), minlength=V).float()
    assert _chi2(c2, marg2) < CHI2_CRIT_DF7_P001
    assert _chi2(c3, marg3) < CHI2_CRIT_DF7_P001
    core.pool.check_no_leak(0)
