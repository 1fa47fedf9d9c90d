"""The engine against Hugging Face transformers: same greedy tokens, same logprobs, with
batching, prefix-cache hits, chunked prefill, retraction and multi-token verify steps."""
from __future__ import annotations

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.weights import reference_hf_model

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Once upon a time, in a land far away, there lived a",
    "a",
    "1, 2, 3, 4, 5,",
    "The weather today is sunny and the birds are singing in the trees of the old park",
    "Hello",
    "import torch\nimport numpy as np\n",
]
SHARED = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. "


def hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by plain forward passes (no generate() quirks), with logprobs."""
    out, lps = [], []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([seq])).logits[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            out.append(tok)
            seq.append(tok)
    return out, lps


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir: str) -> torch.nn.Module:
    return reference_hf_model(tiny_model_dir, torch.float32)


def _prompts_ids(engine: Engine) -> list[list[int]]:
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ids.append(tok(SHARED + "What is the answer?")["input_ids"])
    ids.append(tok(SHARED + "Why is that so?")["input_ids"])
    return ids


@pytest.mark.parametrize(
    "opts",
    [
        dict(chunked_prefill=True, max_batch_tokens=16, page_size=4),
        dict(chunked_prefill=False, page_size=16),
        dict(prefix_cache=False, page_size=1),
        dict(chunked_prefill=True, max_batch_tokens=64, page_size=4, graph_rows=64),
    ],
    ids=["chunked", "unchunked", "nocache-page1", "decode-shape-prefill"],
)
def test_greedy_matches_transformers(tiny_model_dir: str, tiny_hf: torch.nn.Module, opts: dict) -> None:
    opts = dict(opts)
    graph_rows = opts.pop("graph_rows", None)
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", **opts)
    if graph_rows is not None:  # what CUDA does when a batch fits the decode graphs: every row in decode shape
        engine.core.runner.graph_rows = graph_rows
    prompts = _prompts_ids(engine)
    results = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2))
    for ids, r in zip(prompts, results):
        ref, ref_lp = hf_greedy(tiny_hf, ids, 12)
        assert r.token_ids == ref
        assert r.finish_reason == "length"
        assert r.prompt_tokens == len(ids)
        got_lp = [lp.logprob for lp in r.logprobs]
        assert got_lp == pytest.approx(ref_lp, abs=1e-3)
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in r.logprobs)
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_prefix_cache_hit_does_not_change_output(tiny_model_dir: str, tiny_hf: torch.nn.Module) -> None:
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    tok = engine.tokenizer
    a = tok(SHARED + "First question?")["input_ids"]
    b = tok(SHARED + "Second question, longer?")["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = engine.generate([a], params)[0]
    second = engine.generate([b], params)[0]
    assert first.cached_tokens == 0
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert second.cached_tokens == shared // 4 * 4 > 0
    assert second.token_ids == hf_greedy(tiny_hf, b, 8)[0]
    again = engine.generate([a], params)[0]
    assert again.cached_tokens >= (len(a) - 1) // 4 * 4
    assert again.token_ids == first.token_ids
    engine.core.scheduler.check_no_leak()
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_retraction_under_tiny_pool_keeps_outputs_and_leaks_nothing(tiny_model_dir: str, tiny_hf: torch.nn.Module) -> None:
    # 8 pages of 4 tokens: the batch cannot decode together and must retract and recompute.
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, kv_cache_tokens=36)
    tok = engine.tokenizer
    prompts = [tok(p)["input_ids"][:10] for p in PROMPTS[:6]]
    results = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert engine.core.scheduler.num_retractions > 0
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny_hf, ids, 10)[0]
    engine.core.scheduler.check_no_leak()
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_sequence_longer_than_pool_finishes_with_length(tiny_model_dir: str) -> None:
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, kv_cache_tokens=16)
    r = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert r.finish_reason == "length"
    assert 0 < len(r.token_ids) < 100
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_multi_token_verify_step_equals_single_steps(tiny_model_dir: str, tiny_hf: torch.nn.Module) -> None:
    """Feeding drafts (some right, some wrong) through k>1 verify rows gives exactly the
    greedy output: positions, KV writes and rollback are right for q_len > 1."""
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    ids = engine.tokenizer(PROMPTS[2])["input_ids"]
    ref = hf_greedy(tiny_hf, ids, 20)[0]
    req = engine.core.add_request("r", ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    step = 0
    while not req.finished:
        n = len(req.output_ids)
        drafts = {}
        if n:
            good = ref[n : n + 3]
            drafts["r"] = good[:2] + [(good[2] + 1) % 500] if step % 2 and len(good) == 3 else good
        engine.core.step(drafts)
        step += 1
    assert req.output_ids == ref
    assert req.accept_length > 1.5
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_seeded_sampling_reproducible(tiny_model_dir: str) -> None:
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32")
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate([PROMPTS[0]], p)[0]
    # Same seed inside a different batch: the same tokens.
    b = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], p)[1]
    c = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    engine.shutdown()


def test_params_per_prompt(tiny_model_dir: str) -> None:
    """A sequence of SamplingParams applies one to each prompt, in one batch: each result
    equals its prompt run alone with its params; a sequence of the wrong length is an error."""
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32")
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(3)]
    params[1] = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, n=2)
    both = engine.generate(PROMPTS[:3], params)
    assert [len(r.token_ids) for r in both] == [3, 6, 6, 7]
    alone = [r for p, sp in zip(PROMPTS[:3], params) for r in engine.generate([p], sp)]
    assert [r.token_ids for r in both] == [r.token_ids for r in alone]
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(PROMPTS[:3], params[:2])
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


def test_stops_and_bad_input(tiny_model_dir: str) -> None:
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", max_model_len=64)
    free = engine.generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    # A stop token id that greedy decoding will hit ends the output there, inclusive.
    stop_tok = free.token_ids[3]
    r = engine.generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
    assert r.token_ids == free.token_ids[: free.token_ids.index(stop_tok) + 1]
    assert r.finish_reason == "stop" and r.stop_reason == stop_tok
    # A stop string ends the text before it.
    piece = free.text[len(free.text) // 2 :][:3]
    if piece.strip():
        s = engine.generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[piece]))[0]
        assert s.text == free.text[: free.text.index(piece)]
        assert s.finish_reason == "stop" and s.stop_reason == piece
    with pytest.raises(ValueError, match="context"):
        engine.generate([[1] * 64], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[10**9]], SamplingParams(max_tokens=1))
    # Generation stops at the context length.
    long = engine.generate([[5] * 60], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 4
    engine.shutdown()
    engine.core.pool.check_no_leak(0)
