"""Speculation never changes the output: identical greedy tokens, the target's exact
distribution under sampling (chi-square), no page leaked by rejected drafts, stops inside
an accepted run end where they would without speculation."""
from __future__ import annotations

import itertools

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.config import EngineConfig
from runtime.engine.speculative.base import DraftTree
from runtime.engine.speculative.ngram import NgramDrafter
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


def test_draft_trees_greedy_identical_and_kv_compacted(tiny_model_dir: str) -> None:
    check_draft_trees(tiny_model_dir, "cpu")


def check_draft_trees(model_dir: str, device: str, **engine_kw) -> EngineCore:
    """Trees whose right answer is never the first child: the accepted path runs through
    later siblings, so its KV must be moved into place for the outputs to stay exact."""
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    base = Engine(model_dir, device=device, dtype="float32", page_size=2, **engine_kw)
    ref = {f"r{i}": r.token_ids for i, r in enumerate(base.generate(PROMPTS, params))}
    base.shutdown()
    core = Engine(model_dir, device=device, dtype="float32", page_size=2, kv_cache_tokens=600, **engine_kw).core
    for i, p in enumerate(PROMPTS):
        core.add_request(f"r{i}", core.loaded.tokenizer(p)["input_ids"], params)
    reqs = list(core.requests.values())
    gen = torch.Generator().manual_seed(0)
    gained = []
    while core.has_work:
        drafts = {}
        for r in core.scheduler.running:
            m, want = len(r.output_ids), ref[r.rid]
            if not m:
                continue
            nxt = want[m : m + 3] + [0, 0, 0]
            wrong = [(t + 1 + int(torch.randint(0, 50, (1,), generator=gen))) % 512 for t in nxt[:3]]
            # node: 0 wrong, 1 right (depth 1); 2 wrong, 3 right (under 1); 4 right (under 3);
            # 5 wrong (under 0)
            drafts[r.rid] = DraftTree([wrong[0], nxt[0], wrong[1], nxt[1], nxt[2], wrong[2]], [-1, -1, 1, 1, 3, 0])
        for out in core.step(drafts):
            if out.new_token_ids and out.req.rid in drafts:
                gained.append(len(out.new_token_ids))
    assert {r.rid: r.output_ids for r in reqs} == ref
    assert max(gained) == 4  # three accepted nodes plus the bonus token
    core.scheduler.check_no_leak()
    core.cache.reset()
    core.pool.check_no_leak(0)
    return core


def test_draft_tree_helpers() -> None:
    t = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2])
    assert t.depths() == [1, 1, 2, 3]
    assert t.ancestors_mask() == [0b1, 0b10, 0b101, 0b1101]
    assert not t.is_chain and DraftTree.chain([1, 2, 3]).is_chain
    assert t.within_depth(2) == DraftTree([5, 6, 7], [-1, -1, 0])
    with pytest.raises(ValueError, match="parents must come first"):
        DraftTree([1, 2], [1, -1])


def test_verify_rows_capped_to_graph_capacity() -> None:
    from runtime.engine.verify import cap_verify_rows

    tree = DraftTree(list(range(10)), [-1, -1, 0, 0, 1, 2, 2, 4, 6, 7])
    drafts = {"a": tree, "b": [5, 6, 7, 8]}
    assert cap_verify_rows(drafts, 2, 64) == drafts  # 2 + 14 rows fit
    capped = cap_verify_rows(drafts, 2, 8)  # 8 rows for 2 requests: 3 drafts each
    assert capped["a"] == DraftTree([0, 1, 2], [-1, -1, 0]) and capped["b"] == [5, 6, 7]
    assert sum(1 + len(d) for d in capped.values()) <= 8
    assert cap_verify_rows(drafts, 6, 4)["b"] == [5]  # never below one draft token


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_drafts_trimmed_to_the_decode_graphs_under_either_policy(tiny_model_dir: str, policy: str) -> None:
    """With decode graphs of R rows, a step's drafts leave at most R verify rows, even under
    the fixed policy (an eager verify of hundreds of rows costs more than it gains)."""
    from types import SimpleNamespace

    core = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="ngram",
                  num_draft_tokens=4, speculative_policy=policy).core
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(3):
        core.add_request(f"c{i}", core.loaded.tokenizer(COPY)["input_ids"], params)
    while len([r for r in core.scheduler.running if r.output_ids]) < 3:
        core.step()
    core.drafter.propose = lambda reqs, k: {r.rid: [7, 8, 9, 10][:k] for r in reqs}  # the tiny model copies nothing
    untrimmed, k = core._propose()
    assert k == 4 and all(len(d) == 4 for d in untrimmed.values()) and len(untrimmed) == 3
    core.runner.graphs = SimpleNamespace(max_batch=9)  # only _propose reads it here
    try:
        drafts, _ = core._propose()
    finally:
        core.runner.graphs = None
    assert sorted(drafts) == sorted(untrimmed) and all(len(d) == 2 for d in drafts.values())  # 3 x (1 + 2) rows
    while core.has_work:
        core.step()
    core.scheduler.check_no_leak()
    core.cache.reset()
    core.pool.check_no_leak(0)


def test_ngram_lookup() -> None:
    d = NgramDrafter(max_n=3)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert d.lookup([5, 6, 7], 2) == []
    assert d.lookup([1, 2, 1, 2, 1], 2) == [2, 1]  # the latest earlier match


def _scan_lookup(ids: list[int], k: int, max_n: int, min_n: int, window: int) -> list[int]:
    """The definition: scan the window backwards for the latest earlier match of the tail."""
    ids = ids[-window:]
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == ids[-n:]:
                return ids[start + n : start + n + k]
    return []


@pytest.mark.parametrize("max_n,min_n,window", [(4, 1, 4096), (3, 2, 24), (2, 1, 7)])
def test_ngram_index_equals_the_scan(max_n: int, min_n: int, window: int) -> None:
    """The incremental index proposes what a scan of the window proposes, step after step,
    as accepted runs of various lengths are appended (a small vocabulary: many matches)."""
    from runtime.engine.request import Req

    gen = torch.Generator().manual_seed(max_n * 100 + window)
    drafter = NgramDrafter(max_n=max_n, min_n=min_n, window=window)
    reqs = [Req(rid=f"r{i}", prompt_ids=torch.randint(0, 5, (int(n),), generator=gen).tolist(),
                params=SamplingParams(), seed=0, arrival=i) for i, n in enumerate((1, 9, 40))]
    for _ in range(30):
        got = drafter.propose(reqs, 3)
        for r in reqs:
            assert got.get(r.rid, []) == _scan_lookup(r.all_ids, 3, max_n, min_n, window)
            r.output_ids += torch.randint(0, 5, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    drafter.release(reqs[0])
    assert reqs[0].rid not in drafter._index


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


def _tree_proposal(likely: list[int], gen: torch.Generator) -> DraftTree:
    """Three distinct first tokens (the likely one second), two children under each of the
    first two, one of them the likely second token."""
    firsts = [t for t in torch.randperm(V, generator=gen).tolist() if t != likely[0]][:2]
    firsts.insert(1, likely[0])
    seconds = [t for t in torch.randperm(V, generator=gen).tolist() if t != likely[1]][:1] + [likely[1]]
    return DraftTree(firsts + seconds + seconds[::-1], [-1, -1, -1, 0, 0, 1, 1])


@pytest.mark.parametrize("drafts", ["likely", "random", "tree"])
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
        proposal = {r.rid: (likely if drafts == "likely" else _tree_proposal(likely, gen) if drafts == "tree"
                            else torch.randint(0, V, (2,), generator=gen).tolist())
                    for r in reqs if r.output_ids and not r.finished}
        core.step(proposal)
    assert max(r.accept_length for r in reqs) > 1.0
    c2 = torch.bincount(torch.tensor([r.output_ids[1] for r in reqs]), minlength=V).float()
    c3 = torch.bincount(torch.tensor([r.output_ids[2] for r in reqs]), minlength=V).float()
    assert _chi2(c2, marg2) < CHI2_CRIT_DF7_P001
    assert _chi2(c3, marg3) < CHI2_CRIT_DF7_P001
    core.pool.check_no_leak(0)
