"""Speculation on SmolLM2-135M-Instruct's real weights (CPU, float32): for every drafter
(n-gram, a draft model, EAGLE chains and trees) greedy outputs in one batch of
mixed-length prompts equal those without speculation, and no KV page of any pool leaks.
The EAGLE head is random (its drafts are rarely accepted: exactness and the drafting
paths, the continued drafting included, on real weights); n-gram and the draft model
(the target's first layers) get drafts accepted on these prompts."""
from __future__ import annotations

import json
import os

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.speculative.eagle_head import EagleHead, save_head
from runtime.engine.weights import load_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Count from one to twenty in words: one, two, three, four,",
    "red, green, blue, yellow, red, green, blue, yellow, red, green, blue, yellow, red,",  # it repeats the list
    "def add(a, b):\n",
]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(smollm2_dir: str) -> list[list[int]]:
    engine = Engine(smollm2_dir, device="cpu", dtype="float32")
    return [r.token_ids for r in engine.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def draft_dir(smollm2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The target's first 8 decoder layers (embeddings, final norm and lm_head kept)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("smol-draft")
    for name in os.listdir(smollm2_dir):
        if name != "model.safetensors" and os.path.isfile(os.path.join(smollm2_dir, name)):
            with open(os.path.join(smollm2_dir, name), "rb") as src, open(out / name, "wb") as dst:
                dst.write(src.read())
    with open(out / "config.json") as fh:
        cfg = json.load(fh)
    cfg["num_hidden_layers"] = 8
    with open(out / "config.json", "w") as fh:
        json.dump(cfg, fh)
    state = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    keep = {k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 8}
    save_file(keep, str(out / "model.safetensors"))
    return str(out)


@pytest.fixture(scope="module")
def head_dir(smollm2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    head = EagleHead.for_target(load_model(smollm2_dir, device="cpu", dtype="float32").model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = str(tmp_path_factory.mktemp("smol-eagle") / "head")
    save_head(path, head, {"target_model": "SmolLM2-135M-Instruct"})
    return path


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle-chain", "eagle-4x12"])
def test_speculation_on_smollm2_is_exact(smollm2_dir: str, reference: list[list[int]], draft_dir: str,
                                         head_dir: str, method: str) -> None:
    kw: dict = dict(speculative=method.split("-")[0], num_draft_tokens=4, speculative_policy="fixed")
    if method == "draft":
        kw["draft_model"] = draft_dir
    elif method.startswith("eagle"):
        kw.update(draft_model=head_dir, speculative_tree=method.split("-")[1])
    engine = Engine(smollm2_dir, device="cpu", dtype="float32", **kw)
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    if method in ("ngram", "draft"):  # drafts get accepted (the truncated draft model agrees less often)
        assert max(r.accept_length for r in results) > (1.5 if method == "ngram" else 1.05), [r.accept_length for r in results]
    engine.shutdown()
    engine.core.pool.check_no_leak(0)
    drafter_pool = getattr(engine.core.drafter, "pool", None)
    if drafter_pool is not None:
        drafter_pool.check_no_leak(0)
