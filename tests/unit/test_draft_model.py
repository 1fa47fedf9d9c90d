"""Draft-model speculation: outputs identical to no speculation, an identical draft accepts
(almost) every token, each proposal is the draft model's own greedy continuation (so the
draft KV kept across steps is right), no page leaked in either pool, and a clear error for a
draft with another vocabulary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import Engine, SamplingParams
from runtime.engine.speculative.draft_model import DraftModelDrafter
from runtime.engine.request import Req
from tests.unit.test_engine import PROMPTS
from tests.unit.test_spec_policy import Intermittent
from tests.unit.test_speculative import COPY

K = 4
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def near_draft_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The target with noisy weights: it agrees with the target often but not always, so
    steps accept some drafts and reject the rest."""
    path = tmp_path_factory.mktemp("tiny-near-draft")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tensors = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    noisy = {n: t + 0.05 * torch.randn(t.shape, generator=gen) * t.std() for n, t in tensors.items()}
    save_file(noisy, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str) -> list[list[int]]:
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    return [r.token_ids for r in base.generate(PROMPTS + [COPY], GREEDY)]


def _spec(target: str, draft: str, **kw: object) -> Engine:
    opts: dict = dict(device="cpu", dtype="float32", page_size=4, speculative="draft", draft_model=draft,
                      num_draft_tokens=K, speculative_policy="fixed")
    return Engine(target, **{**opts, **kw})


def _check_no_leak(engine: Engine) -> None:
    engine.shutdown()
    engine.core.pool.check_no_leak(0)
    drafter = engine.core.drafter
    assert isinstance(drafter, DraftModelDrafter) and not drafter.states
    drafter.pool.check_no_leak(0)


def test_identical_draft_accepts_nearly_everything(tiny_model_dir: str, reference: list[list[int]]) -> None:
    spec = _spec(tiny_model_dir, tiny_model_dir)
    got = spec.generate(PROMPTS + [COPY], GREEDY)
    assert [r.token_ids for r in got] == reference
    # 23 decode tokens in steps of k+1 = 5: 4.6 when every draft is accepted.
    assert min(r.accept_length for r in got) > 0.8 * (K + 1)
    _check_no_leak(spec)


@pytest.mark.parametrize("which", ["near", "unrelated"])
def test_greedy_identical_and_proposals_are_draft_greedy(
    tiny_model_dir: str, tiny_tied_model_dir: str, near_draft_dir: str, reference: list[list[int]], which: str
) -> None:
    draft = near_draft_dir if which == "near" else tiny_tied_model_dir
    spec = _spec(tiny_model_dir, draft)
    drafter = spec.core.drafter
    assert isinstance(drafter, DraftModelDrafter)
    proposals: list[tuple[list[int], list[int]]] = []
    propose = drafter.propose

    def recording(reqs, k):  # type: ignore[no-untyped-def]
        out = propose(reqs, k)
        proposals.extend((r.all_ids, out[r.rid]) for r in reqs if r.rid in out)
        return out

    drafter.propose = recording  # type: ignore[method-assign]
    got = spec.generate(PROMPTS + [COPY], GREEDY)
    assert [r.token_ids for r in got] == reference
    if which == "near":  # partly accepted: the rollback of rejected draft KV is exercised
        assert 1.0 < sum(r.accept_length for r in got) / len(got) < K
    _check_proposals(spec, proposals)
    _check_no_leak(spec)


def test_foreign_drafts_keep_only_matching_draft_kv(tiny_model_dir: str, near_draft_dir: str,
                                                   reference: list[list[int]]) -> None:
    # The step verifies drafts other than the drafter's (here the target's own greedy
    # continuation, all accepted): the draft KV written for the drafter's proposal is valid
    # only up to the first position where it differs from what was accepted.
    spec = _spec(tiny_model_dir, near_draft_dir)
    core, drafter = spec.core, spec.core.drafter
    assert isinstance(drafter, DraftModelDrafter)
    ref = {}
    for i, p in enumerate(PROMPTS + [COPY]):
        ref[core.add_request(f"r{i}", spec.tokenizer(p)["input_ids"], GREEDY).rid] = reference[i]
    proposals: list[tuple[list[int], list[int]]] = []
    differ = 0
    while core.has_work:
        reqs = [r for r in core.scheduler.running if r.output_ids]
        mine = drafter.propose(reqs, K)
        proposals += [(r.all_ids, mine[r.rid]) for r in reqs]
        foreign = {r.rid: ref[r.rid][len(r.output_ids) : len(r.output_ids) + K] for r in reqs}
        differ += sum(mine[rid][: K - 1] != d[: K - 1] for rid, d in foreign.items())
        core.step(foreign)
    assert differ > 5  # the drafter's KV for its own drafts was partly wrong, many times
    _check_proposals(spec, proposals)
    _check_no_leak(spec)


def _check_proposals(spec: Engine, proposals: list[tuple[list[int], list[int]]]) -> None:
    """Every proposal, however much draft KV it reused, equals the draft's greedy run from
    scratch (a fresh drafter; the identical-draft test ties that run to the target)."""
    fresh = DraftModelDrafter(spec.core)
    reqs = [Req(f"p{i}", ids, GREEDY, seed=0, arrival=i) for i, (ids, _) in enumerate(proposals)]
    assert len(reqs) > 20
    again = fresh.propose(reqs, K)
    assert [again[r.rid] for r in reqs] == [d for _, d in proposals]
    for r in reqs:
        fresh.release(r)
    fresh.pool.check_no_leak(0)


def test_retraction_under_tiny_pools(tiny_model_dir: str) -> None:
    # 9 usable pages of 4 tokens in each pool: requests are retracted and recomputed, and
    # the draft pool must drop retracted requests' state to make room.
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    prompts = [base.tokenizer(p)["input_ids"][:10] for p in PROMPTS[:6]]
    ref = [r.token_ids for r in base.generate(prompts, params)]
    spec = _spec(tiny_model_dir, tiny_model_dir, kv_cache_tokens=36)
    got = spec.generate(prompts, params)
    assert spec.core.scheduler.num_retractions > 0
    assert [r.token_ids for r in got] == ref
    assert max(r.accept_length for r in got) > 1.0
    _check_no_leak(spec)


def test_draft_pool_exhaustion_skips_requests(tiny_model_dir: str, reference: list[list[int]]) -> None:
    spec = _spec(tiny_model_dir, tiny_model_dir)
    # 12 pages of 4 tokens cannot hold the draft KV of 9 requests of 10..30 tokens.
    small = DraftModelDrafter(spec.core, num_pages=13)
    spec.core.drafter = small
    got = spec.generate(PROMPTS + [COPY], GREEDY)
    assert [r.token_ids for r in got] == reference
    lengths = sorted(r.accept_length for r in got)
    assert lengths[0] < lengths[-1] and lengths[-1] > 1.0  # some requests drafted, some could not
    _check_no_leak(spec)


def test_vocab_mismatch_is_a_clear_error(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    with pytest.raises(ValueError, match="vocabulary of 256 tokens.*512"):
        _spec(tiny_model_dir, str(tmp_path), load_format="dummy")


def test_drafting_on_and_off_stays_exact(tiny_model_dir: str, reference: list[list[int]]) -> None:
    """Drafting one step in five (what the adaptive policy does to a drafter it doubts): the
    draft model catches up on the tokens it skipped, outputs stay exact, an identical draft
    still accepts whole runs when it drafts, and no page leaks."""
    spec = _spec(tiny_model_dir, tiny_model_dir)
    spec.core.policy = Intermittent(K, 5)
    got = spec.generate(PROMPTS + [COPY], GREEDY)
    assert [r.token_ids for r in got] == reference
    assert max(spec.core.accept_samples) == K + 1
    _check_no_leak(spec)
