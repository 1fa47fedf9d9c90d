"""The EAGLE drafter on CUDA: its chains and trees equal the training-time simulation
(decode-shape draft steps with the tree rule on the Triton kernel), and greedy outputs
with speculation equal those without, with and without CUDA graphs, and drafting continued behind verification is exact."""
from __future__ import annotations

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.speculative.eagle import EagleDrafter
from runtime.engine.speculative.eagle_head import save_head
from runtime.engine.weights import load_model
from tests.unit.test_eagle import check_continued_drafting, feed_and_compare, random_head, trained_head  # noqa: F401
from tests.unit.test_engine import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def head_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("eagle") / "h")
    save_head(path, random_head(load_model(tiny_model_dir, device="cpu", dtype="float32"), seed=4), {"target_model": "tiny"})
    return path


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tree", [None, (3, 10)], ids=["chain", "tree3x10"])
def test_drafter_matches_simulation_cuda(tiny_model_dir: str, head_dir: str, backend: str, tree) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    spec = f"{tree[0]}x{tree[1]}" if tree else "chain"
    engine = Engine(tiny_model_dir, device="cuda", dtype="float32", attention_backend=backend, page_size=4,
                    speculative="eagle", draft_model=head_dir, speculative_tree=spec, num_draft_tokens=4)
    drafter = engine.core.drafter
    assert isinstance(drafter, EagleDrafter) and drafter.attn.name == backend
    feed_and_compare(drafter, tree, (4, 3), (1, 3, 2, 1), k=4, seed=0)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("tree", ["chain", "4x12"])
def test_eagle_greedy_identical_cuda(tiny_model_dir: str, head_dir: str, graphs: bool, tree: str) -> None:
    pytest.importorskip("triton")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", attention_backend="triton", page_size=4, cuda_graph=graphs)
    base = Engine(tiny_model_dir, **kw)
    ref = [r.token_ids for r in base.generate(PROMPTS, params)]
    base.shutdown()
    spec = Engine(tiny_model_dir, **kw, speculative="eagle", draft_model=head_dir, speculative_tree=tree,
                  num_draft_tokens=4, speculative_policy="fixed")
    assert [r.token_ids for r in spec.generate(PROMPTS, params)] == ref
    spec.shutdown()
    spec.core.pool.check_no_leak(0)
    spec.core.drafter.pool.check_no_leak(0)


@pytest.mark.parametrize("tree", ["chain", "4x12"])
@pytest.mark.parametrize("graphs", [False, True])
def test_drafting_continued_behind_verify_cuda(trained_head: str, tiny_model_dir: str, graphs: bool, tree: str) -> None:
    """The continued drafting on CUDA, eager or replayed from the continuation graphs."""
    pytest.importorskip("triton")
    check_continued_drafting(trained_head, tiny_model_dir, tree, device="cuda", attention_backend="triton",
                             cuda_graph=graphs)
