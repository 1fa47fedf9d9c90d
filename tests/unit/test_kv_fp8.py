"""An FP8 (e4m3) KV cache: `--kv-cache-dtype fp8_e4m3` / `Engine(kv_cache_dtype=...)`.

On CPU the torch attention path runs it (the Triton kernels' FP8 loads and stores are tested
under the interpreter in the kernels' own test files, and on CUDA in tests/gpu)."""
from __future__ import annotations

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.config import EngineConfig
from runtime.engine.quant.evaluate import forced_agreement, mean_kl, sequence_logits

FP8 = torch.float8_e4m3fn


def test_fp8_pool_holds_twice_the_tokens_and_frees_every_page(tiny_model_dir: str) -> None:
    kw = dict(device="cpu", dtype="bfloat16", page_size=4, kv_cache_tokens=256)
    dense, fp8 = Engine(tiny_model_dir, **kw), Engine(tiny_model_dir, kv_cache_dtype="fp8_e4m3", **kw)
    assert dense.core.pool.kv.dtype == torch.bfloat16 and fp8.core.pool.kv.dtype == FP8
    assert fp8.core.pool.page_bytes * 2 == dense.core.pool.page_bytes
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5] * 30]
    out = fp8.generate(prompts, params)
    assert [len(r.token_ids) for r in out] == [12, 12, 12]
    # What a prefix hit serves is the FP8 KV itself: the same request again gives the same text.
    again = fp8.generate(prompts[:1], params)[0]
    assert again.cached_tokens > 0 and again.token_ids == out[0].token_ids
    fp8.shutdown()
    fp8.core.pool.check_no_leak(0)
    dense.shutdown()


def test_fp8_kv_is_close_to_the_dense_cache(tiny_model_dir: str) -> None:
    eng = Engine(tiny_model_dir, device="cpu", dtype="bfloat16")
    model = eng.core.loaded.model
    ids = [(i * 37 + 11) % 500 for i in range(96)]
    dense = sequence_logits(model, ids)
    fp8 = sequence_logits(model, ids, kv_dtype=FP8)
    kl = mean_kl(dense, fp8)
    # e4m3 keeps 3 mantissa bits: the logits move (so the cache really is FP8) but little.
    assert 0.0 < kl < 1e-2, kl
    eng.shutdown()


def test_fp8_kv_config_errors() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="not flashinfer"):
        EngineConfig(kv_cache_dtype="fp8_e4m3", attention_backend="flashinfer")
    with pytest.raises(ValueError, match="needs a bfloat16 or float16 model"):
        EngineConfig(kv_cache_dtype="fp8_e4m3").kv_torch_dtype(torch.float32)


@pytest.mark.slow
def test_smollm2_fp8_kv_agrees_with_bf16_kv(smollm2_dir: str) -> None:
    """Real weights: each greedy token of the bf16-cache engine judged with an FP8 cache and
    the same prefix (teacher-forced), over the engine test prompts x 32 tokens."""
    from tests.unit.test_engine import PROMPTS, SHARED

    prompts = PROMPTS + [SHARED + "What is the answer?"]
    eng = Engine(smollm2_dir, device="cpu", dtype="bfloat16")
    ids = [eng._encode(p) for p in prompts]
    base = [r.token_ids for r in eng.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))]
    model = eng.core.loaded.model
    agree = []
    for i, b in zip(ids, base):
        logits = sequence_logits(model, i + b[:-1], kv_dtype=FP8)
        agree.append(sum(a == t for a, t in zip(logits[len(i) - 1:].argmax(-1).tolist(), b)) / len(b))
    assert sum(agree) / len(agree) >= 0.9, agree
    # The dense cache agrees with itself: the check can tell FP8 apart.
    assert forced_agreement(model, ids[0], base[0]) >= sum(agree) / len(agree)
    eng.shutdown()
