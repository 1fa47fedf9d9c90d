"""The CPU decode path (issue 17): RMSNorm through torch's rms_norm, rotary in place over
q|k, one K|V store, and FlatLayers, the layer loop without module dispatch, each give the
same bits as the reference math and the modules (so fp32 stays exactly Hugging Face's and
bf16 greedy output does not move)."""
from __future__ import annotations

import pytest
import torch

from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, apply_rms_norm, apply_rotary, apply_rotary_
from runtime.engine.weights import load_model


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_the_reference_math(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 64):
        for width in (64, 576, 960):
            for scale in (1e-3, 1.0, 40.0):
                x = (torch.randn(rows, width, generator=gen) * scale).to(dtype)
                w = (torch.rand(width, generator=gen) + 0.5).to(dtype)
                assert torch.equal(apply_rms_norm(x, w, 1e-5), _reference_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_over_q_and_k_is_apply_rotary(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 3, 9, 3, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    angles = torch.randn(t, 1, d // 2, generator=gen)
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    q = apply_rotary(qkv[:, : hq * d].reshape(t, hq, d), cos, sin)
    k = apply_rotary(qkv[:, hq * d : (hq + hkv) * d].reshape(t, hkv, d), cos, sin)
    v = qkv[:, (hq + hkv) * d :].clone()
    qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)
    apply_rotary_(qk, cos, sin)
    assert torch.equal(qk[:, :hq], q) and torch.equal(qk[:, hq:], k)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v)  # v untouched


def test_store_writes_k_and_v_of_each_token() -> None:
    pool = KVPool(3, 6, 4, 2, 8, torch.float32, "cpu")
    kv = torch.randn(3, 2, 2, 8)
    slots = torch.tensor([5, 6, 17])  # (page, offset): (1, 1), (1, 2), (4, 1)
    pool.store(2, ForwardContext(pool, TorchAttention(), slots).kv_index, kv)
    for i, (page, off) in enumerate([(1, 1), (1, 2), (4, 1)]):
        assert torch.equal(pool.k_cache(2)[page, off], kv[i, 0])
        assert torch.equal(pool.v_cache(2)[page, off], kv[i, 1])
    assert pool.kv[:, :2].abs().sum() == 0  # other layers untouched
    assert pool.kv.ne(0).sum() == 3 * 2 * 2 * 8


def _forward_twice(lm, flat: bool) -> list[torch.Tensor]:
    """A 5-token prefill, then two decode steps of one token: each forward's hidden states."""
    cfg, ps = lm.config, 4
    pool = KVPool(cfg.num_layers, 4, ps, cfg.num_kv_heads, cfg.head_dim, lm.dtype, "cpu")
    pages = pool.alloc(2)
    saved = lm.model.model.flat
    if not flat:
        lm.model.model.flat = None
    outs = []
    try:
        for start, ids in ((0, [3, 17, 5, 9, 11]), (5, [23]), (6, [7])):
            n = len(ids)
            meta = AttentionMetadata.build([n], [start + n], [pages], ps, torch.device("cpu"))
            attn = TorchAttention()
            attn.prepare(meta)
            pos = torch.arange(start, start + n)
            slots = torch.tensor(pages)[pos // ps] * ps + pos % ps
            with torch.inference_mode():
                outs.append(lm.model(torch.tensor(ids), pos, ForwardContext(pool, attn, slots)))
    finally:
        lm.model.model.flat = saved
    return outs


@pytest.mark.parametrize("dtype,quant", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"),
                                         ("bfloat16", "int4")])
def test_flat_layers_are_the_modules_bit_for_bit(tiny_model_dir: str, dtype: str, quant: str) -> None:
    lm = load_model(tiny_model_dir, dtype=dtype, quantization=quant)
    lm.model.fuse_projections()
    assert lm.model.model.flat is not None
    for a, b in zip(_forward_twice(lm, flat=True), _forward_twice(lm, flat=False)):
        assert torch.equal(a, b)


def test_flat_layers_take_dense_biases_and_leave_quantized_ones_to_the_modules(tiny_qwen2_dir: str) -> None:
    lm = load_model(tiny_qwen2_dir, dtype="float32", quantization="none")
    lm.model.fuse_projections()
    assert lm.model.model.flat is not None
    for a, b in zip(_forward_twice(lm, flat=True), _forward_twice(lm, flat=False)):
        assert torch.equal(a, b)
    q = load_model(tiny_qwen2_dir, dtype="bfloat16", quantization="int4")
    q.model.fuse_projections()
    assert q.model.model.flat is None  # an int4 q|k|v with a bias has no single op
