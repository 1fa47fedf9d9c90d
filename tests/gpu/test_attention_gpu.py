"""GPU attention backends against TorchAttention: the Triton decode kernel, TritonAttention
and FlashInferAttention, in bf16 and fp32, on random paged caches with scattered pages."""
from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from runtime.engine.attention import make_attention_backend  # noqa: E402
from runtime.engine.attention.base import AttentionBackend, AttentionMetadata  # noqa: E402
from runtime.engine.attention.torch_ref import TorchAttention  # noqa: E402
from runtime.engine.kv_pool import KVPool  # noqa: E402

try:
    importlib.import_module("flashinfer")
    HAS_FLASHINFER = True
except Exception:  # absent, or present but broken: make_attention_backend skips it too
    HAS_FLASHINFER = False
DEV = torch.device("cuda")
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


class Paged:
    """A random two-layer KVPool (page-major: each layer's K/V is a page-strided view)
    holding `kv_lens` tokens per sequence in pages handed out in random order, and the
    step's metadata for `q_lens` new tokens each."""

    def __init__(
        self,
        q_lens: list[int],
        kv_lens: list[int],
        hq: int,
        hkv: int,
        d: int,
        page_size: int,
        dtype: torch.dtype,
        seed: int = 0,
        custom_mask: bool = False,
        spare_pages: int = 5,
        kv_dtype: torch.dtype | None = None,  # the cache's when it is not q's (FP8)
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        need = [-(-n // page_size) for n in kv_lens]
        num_pages = sum(need) + 1 + spare_pages
        kv_dtype = kv_dtype or dtype
        self.pool = KVPool(2, num_pages, page_size, hkv, d, kv_dtype, DEV)
        self.pool.kv.copy_(torch.randn(self.pool.kv.shape, generator=gen).to(DEV, kv_dtype))
        order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
        self.page_lists = [[order.pop() for _ in range(n)] for n in need]
        mask = None
        if custom_mask:
            mask = torch.rand(len(q_lens), max(q_lens), max(kv_lens), generator=gen) < 0.6
            # Keep every query's own position visible so no row is fully masked.
            for i, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
                for j in range(ql):
                    mask[i, j, kl - ql + j] = True
            mask = mask.to(DEV)
        self.meta = AttentionMetadata.build(q_lens, kv_lens, self.page_lists, page_size, DEV, custom_mask=mask)
        self.q = torch.randn(sum(q_lens), hq, d, generator=gen).to(DEV, dtype)
        self.scale = d**-0.5

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.k_cache(i), self.pool.v_cache(i)

    def reference(self, layer: int = 0) -> torch.Tensor:  # fp32 [T, Hq, D]
        ref = TorchAttention()
        ref.prepare(self.meta)
        k, v = self.layer(layer)
        return ref.forward(self.q.float(), k.float(), v.float(), self.scale)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "output has NaN/inf (a row was not written?)"
    torch.testing.assert_close(got.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------------- the kernel

DECODE_SHAPES = [
    # hq, hkv, d, page_size, kv_lens
    (9, 3, 64, 16, [1, 15, 16, 17, 300, 1023]),  # SmolLM2 heads
    (32, 8, 128, 16, [4096]),  # Llama-8B heads, batch 1, long context
    (32, 8, 128, 1, [1, 77, 513]),  # page size 1
    (8, 8, 96, 7, [5, 100, 2000]),  # MHA, odd page size, head dim not a power of 2
    (16, 1, 64, 32, [33, 64, 65] * 8),  # MQA, g=16
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-d{s[2]}-ps{s[3]}")
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("merge", ["launch", "fused"])
def test_paged_decode_kernel(dtype: torch.dtype, shape: tuple, num_splits: int | None, merge: str) -> None:
    from runtime.kernels.paged_decode import paged_decode

    hq, hkv, d, ps, kv_lens = shape
    p = Paged([1] * len(kv_lens), kv_lens, hq, hkv, d, ps, dtype)
    k, v = p.layer(0)
    for _ in range(2):  # fused: the split counters must be back at zero for the second launch
        out = torch.full_like(p.q, float("nan"))
        got = paged_decode(p.q, k, v, p.meta.page_table, p.meta.kv_lens, p.scale, out=out, num_splits=num_splits,
                           merge=merge)
        assert got is out
        _assert_close(out, p.reference(), dtype)


@pytest.mark.parametrize("shape", DECODE_SHAPES[:2], ids=lambda s: f"{s[0]}-{s[1]}-d{s[2]}-ps{s[3]}")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_paged_decode_kernel_fp8_cache(shape: tuple, num_splits: int | None) -> None:
    """An e4m3 cache beside bf16 queries: the kernel widens what it loads, so it matches the
    reference over the same FP8 values."""
    from runtime.kernels.paged_decode import paged_decode

    hq, hkv, d, ps, kv_lens = shape
    p = Paged([1] * len(kv_lens), kv_lens, hq, hkv, d, ps, torch.bfloat16, kv_dtype=torch.float8_e4m3fn)
    k, v = p.layer(0)
    got = paged_decode(p.q, k, v, p.meta.page_table, p.meta.kv_lens, p.scale, num_splits=num_splits)
    _assert_close(got, p.reference(), torch.bfloat16)


@pytest.mark.parametrize("merge", ["launch", "fused"])
def test_paged_decode_kernel_is_cuda_graph_capturable(merge: str) -> None:
    """Captured once, replayed with other lengths and pages written into the same tensors."""
    from runtime.kernels.paged_decode import paged_decode

    dtype, hq, hkv, d, ps, bsz, max_pages = torch.bfloat16, 8, 2, 64, 16, 4, 64
    big = Paged([1] * bsz, [ps * max_pages - 3] * bsz, hq, hkv, d, ps, dtype, seed=1)
    k, v = big.layer(0)
    q = big.q.clone()
    table = big.meta.page_table.clone()
    lens = big.meta.kv_lens.clone()
    out = torch.empty_like(q)
    paged_decode(q, k, v, table, lens, big.scale, out=out, num_splits=8, merge=merge)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, k, v, table, lens, big.scale, out=out, num_splits=8, merge=merge)
    for seed, kv_lens in [(2, [1, 40, 700, 1021]), (3, [17, 16, 1, 5])]:
        gen = torch.Generator().manual_seed(seed)
        pages = [torch.randperm(k.shape[0] - 1, generator=gen)[: -(-n // ps)] + 1 for n in kv_lens]
        meta = AttentionMetadata.build([1] * bsz, kv_lens, [x.tolist() for x in pages], ps, DEV)
        table.zero_()
        table[:, : meta.page_table.shape[1]] = meta.page_table
        lens.copy_(meta.kv_lens)
        q.copy_(torch.randn(q.shape, generator=gen).to(DEV, dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = TorchAttention()
        ref.prepare(meta)
        _assert_close(out, ref.forward(q.float(), k.float(), v.float(), big.scale), dtype)


EXTEND_SHAPES = {
    # name: (q_lens, kv_lens): prefixes on page boundaries (16, 32, 64) and not
    "prefill": ([300, 17, 1], [300, 17, 1]),
    "prefix_on_pages": ([48, 16, 100], [64, 48, 164]),
    "prefix_off_pages": ([37, 5, 130, 1], [50, 26, 1031, 700]),
    "mixed_decode_rows": ([1] * 20 + [257], [513] * 20 + [257]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128)], ids=["9-3-d64", "32-8-d128"])
@pytest.mark.parametrize("shape", list(EXTEND_SHAPES))
def test_extend_kernel(dtype: torch.dtype, heads: tuple, shape: str) -> None:
    from runtime.kernels.extend_attention import ExtendPlan, extend_attention

    q_lens, kv_lens = EXTEND_SHAPES[shape]
    hq, hkv, d = heads
    p = Paged(q_lens, kv_lens, hq, hkv, d, 16, dtype, seed=len(shape))
    k, v = p.layer(1)
    out = torch.full_like(p.q, float("nan"))
    plan = ExtendPlan(q_lens, hq, hkv, d, dtype, DEV)
    got = extend_attention(p.q, k, v, p.meta.page_table, p.meta.cu_q_lens, p.meta.kv_lens, p.scale, plan, out=out)
    assert got is out
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    ref = p.reference(1)
    assert torch.isfinite(out).all(), "a row was not written"
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", list(EXTEND_SHAPES))
def test_extend_kernel_fp8_cache(shape: str) -> None:
    from runtime.kernels.extend_attention import ExtendPlan, extend_attention

    q_lens, kv_lens = EXTEND_SHAPES[shape]
    p = Paged(q_lens, kv_lens, 32, 8, 128, 16, torch.bfloat16, seed=len(shape), kv_dtype=torch.float8_e4m3fn)
    k, v = p.layer(1)
    plan = ExtendPlan(q_lens, 32, 8, 128, torch.bfloat16, DEV)
    got = extend_attention(p.q, k, v, p.meta.page_table, p.meta.cu_q_lens, p.meta.kv_lens, p.scale, plan)
    _assert_close(got, p.reference(1), torch.bfloat16)


# --------------------------------------------------------------------------- the backends

SCENARIOS = {
    # name: (q_lens, kv_lens, custom_mask)
    "decode": ([1] * 6, [1, 16, 17, 130, 513, 2048], False),
    "prefill": ([37, 16, 5], [37, 16, 5], False),
    "prefill_with_prefix": ([20, 1, 64, 7], [52, 300, 64, 1031], False),
    "mixed": ([1, 9, 1, 128, 3], [700, 9, 2, 200, 19], False),
    "verify_tree_mask": ([5, 5, 5], [40, 5, 129], True),
}


def _backends() -> list:
    names = ["triton"]
    names.append(
        pytest.param("flashinfer", marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer not installed"))
    )
    return names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128)], ids=["9-3-d64", "32-8-d128"])
def test_backend_matches_torch(backend: str, scenario: str, dtype: torch.dtype, heads: tuple) -> None:
    if backend == "flashinfer" and dtype == torch.float32:
        with pytest.raises(TypeError, match="float16/bfloat16"):
            make_attention_backend(backend, DEV, dtype=dtype)
        return
    q_lens, kv_lens, mask = SCENARIOS[scenario]
    hq, hkv, d = heads
    p = Paged(q_lens, kv_lens, hq, hkv, d, 16, dtype, seed=list(SCENARIOS).index(scenario), custom_mask=mask)
    attn: AttentionBackend = make_attention_backend(backend, DEV)
    attn.prepare(p.meta)
    # Two layers per step: the second reuses the plan made for the first.
    for layer in range(2):
        k, v = p.layer(layer)
        out = attn.forward(p.q, k, v, p.scale)
        _assert_close(out, p.reference(layer), dtype)


@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer not installed")
def test_flashinfer_plans_in_prepare_when_shape_is_known() -> None:
    p = Paged([1, 4], [10, 30], 8, 2, 64, 16, torch.bfloat16)
    attn = make_attention_backend("flashinfer", DEV, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    attn.prepare(p.meta)
    assert attn._planned is not None
    k, v = p.layer(0)
    _assert_close(attn.forward(p.q, k, v, p.scale), p.reference(), torch.bfloat16)


def test_auto_picks_a_gpu_backend() -> None:
    assert make_attention_backend("auto", DEV).name == ("flashinfer" if HAS_FLASHINFER else "triton")
    assert make_attention_backend("auto", DEV, dtype=torch.float32).name == "triton"
