"""kernels/gemv.py compiled for the GPU: the model's projection shapes (Llama-3-8B and
SmolLM2, fused as fuse_projections serves them) at decode row counts against an fp64
reference, every sweep candidate, the interpreter cases natively, capture in a CUDA graph,
and the model's `linear` hook."""
from __future__ import annotations

import functools

import pytest
import torch

from tests.unit.test_gemv_interp import CASES, _case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# name -> (N, K) of the fused projections: qkv = q | k | v, gate_up = gate | up.
SHAPES = {
    "llama8b_qkv": (4096 + 2 * 1024, 4096),
    "llama8b_o": (4096, 4096),
    "llama8b_gate_up": (2 * 14336, 4096),
    "llama8b_down": (4096, 14336),
    "smollm2_qkv": (576 + 2 * 192, 576),
    "smollm2_o": (576, 576),
    "smollm2_gate_up": (2 * 1536, 576),
    "smollm2_down": (576, 1536),
}
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)  # decode batches, and the CUDA-graph buckets 12 and 16


@functools.lru_cache(maxsize=None)  # ~0.5 GB of bf16 weights in all
def _weight(n: int, k: int, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16) if bias else None
    return w, b


def _check(name: str, m: int, w: torch.Tensor, b: torch.Tensor | None, config=None) -> None:
    """gemv within half a bf16 ulp (+1e-4 for fp32 accumulation over K up to 14336) of the
    fp64 product: the exact result rounded once, as a user of F.linear expects."""
    from runtime.kernels.gemv import gemv

    x = torch.randn(m, w.shape[1], device="cuda").to(torch.bfloat16)
    got = gemv(x, w, b, config=config)
    ref = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    _, exp = torch.frexp(ref)
    tol = 0.5 * torch.finfo(torch.bfloat16).eps * torch.exp2(exp.double() - 1) + 1e-4
    err = (got.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bad.any(), f"{name} M={m} {config}: {int(bad.sum())} of {err.numel()} off, max error {err.max():.3g}"


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_gemv_matches_fp64_on_model_shapes(name: str, m: int) -> None:
    pytest.importorskip("triton")
    _check(name, m, *_weight(*SHAPES[name]))


def test_gemv_with_bias_on_a_qkv_shape() -> None:  # Qwen2's q/k/v carry a bias
    pytest.importorskip("triton")
    w, b = _weight(*SHAPES["llama8b_qkv"], bias=True)
    for m in (1, 5, 16):
        _check("llama8b_qkv+bias", m, w, b)


@pytest.mark.parametrize("name", ["llama8b_qkv", "smollm2_qkv", "llama8b_down"])
def test_every_sweep_candidate_is_correct(name: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv_configs import CANDIDATES

    w, b = _weight(*SHAPES[name])
    for cfg in CANDIDATES:
        for m in ((1, 3, 8, 16) if cfg.dot else (1,)):
            _check(name, m, w, b, cfg)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_cases_on_cuda(case: tuple) -> None:
    pytest.importorskip("triton")
    assert _case(*case, device="cuda") is None


def test_gemv_captures_in_a_cuda_graph() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv

    w, _ = _weight(*SHAPES["llama8b_qkv"])
    b = torch.randn(w.shape[0], device="cuda").to(torch.bfloat16)
    xs = [torch.randn(m, w.shape[1], device="cuda").to(torch.bfloat16) for m in (1, 8)]
    out = torch.empty(8, w.shape[0], device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        gemv(xs[0], w, b)
        gemv(xs[1], w, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1 = gemv(xs[0], w, b)
        y8 = gemv(xs[1], w, out=out)
    first = (y1.clone(), y8.clone())
    for x in xs:
        x.copy_(torch.randn_like(x, dtype=torch.float32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y1, gemv(xs[0], w, b)) and not torch.equal(y1, first[0])
    assert torch.equal(y8, gemv(xs[1], w)) and not torch.equal(y8, first[1])
    assert y8.data_ptr() == out.data_ptr()


def test_model_linear_routes_decode_rows_to_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv
    from runtime.engine import kernel_dispatch as dispatch

    monkeypatch.setenv("RUNTIME_GEMV_BF16_CONFIGS", "/nonexistent.json")  # the modes alone, no measured table
    lin = torch.nn.Linear(576, 960, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(dispatch, "_GEMV", "auto")
        x = torch.randn(4, 576, device="cuda").to(torch.bfloat16)
        assert torch.equal(dispatch.linear(lin, x), gemv(x, lin.weight, lin.bias))
        wide = torch.randn(32, 576, device="cuda").to(torch.bfloat16)  # a prefill: torch's GEMM
        assert torch.equal(dispatch.linear(lin, wide), lin(wide))
        monkeypatch.setattr(dispatch, "_GEMV", "attn")  # the attention block's projections only
        assert torch.equal(dispatch.linear(lin, x, attn_block=True), gemv(x, lin.weight, lin.bias))
        assert torch.equal(dispatch.linear(lin, x), lin(x))
        monkeypatch.setattr(dispatch, "_GEMV", "off")
        assert torch.equal(dispatch.linear(lin, x), lin(x))
    with torch.enable_grad():  # autograd (train-draft) stays on torch
        monkeypatch.setattr(dispatch, "_GEMV", "auto")
        y = dispatch.linear(lin, x)
        assert y.requires_grad and torch.equal(y, lin(x))


def test_model_linear_follows_the_measured_bf16_table(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shape the table measured goes as measured whatever the mode says (its config, or
    cuBLAS); a shape it did not measure follows the mode; off is cuBLAS throughout."""
    import json
    from dataclasses import asdict

    from runtime.kernels import gemv as gemv_mod
    from runtime.kernels.gemv_configs import GemvConfig
    from runtime.engine import kernel_dispatch as dispatch

    cfg = GemvConfig(8, 256, 1, 4)
    (tmp_path / "t.json").write_text(json.dumps({"960x576@4": asdict(cfg), "576x576@4": "torch"}))
    monkeypatch.setenv("RUNTIME_GEMV_BF16_CONFIGS", str(tmp_path / "t.json"))
    qkv = torch.nn.Linear(576, 960, device="cuda", dtype=torch.bfloat16)
    o = torch.nn.Linear(576, 576, device="cuda", dtype=torch.bfloat16)
    down = torch.nn.Linear(1536, 576, device="cuda", dtype=torch.bfloat16)
    x, xd = (torch.randn(4, k, device="cuda").to(torch.bfloat16) for k in (576, 1536))
    with torch.no_grad():
        monkeypatch.setattr(dispatch, "_GEMV", "attn")
        assert torch.equal(dispatch.linear(qkv, x), gemv_mod.gemv(x, qkv.weight, qkv.bias, config=cfg))  # not attn_block
        assert torch.equal(dispatch.linear(o, x, attn_block=True), o(x))  # measured: cuBLAS
        assert torch.equal(dispatch.linear(down, xd), down(xd))  # not measured, not attn_block: the mode
        monkeypatch.setattr(dispatch, "_GEMV", "auto")
        assert torch.equal(dispatch.linear(down, xd), gemv_mod.gemv(xd, down.weight, down.bias))
        monkeypatch.setattr(dispatch, "_GEMV", "off")
        assert torch.equal(dispatch.linear(qkv, x), qkv(x))


def test_model_linear_rejects_a_bad_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.engine import kernel_dispatch as dispatch

    monkeypatch.setattr(dispatch, "_GEMV", None)
    monkeypatch.setenv("RUNTIME_GEMV", "on")
    lin = torch.nn.Linear(16, 8, device="cuda")
    with pytest.raises(ValueError, match="RUNTIME_GEMV must be 'auto', 'attn' or 'off', got 'on'"):
        dispatch.linear(lin, torch.randn(1, 16, device="cuda"))


@pytest.mark.parametrize("m", (1, 4, 16))
@pytest.mark.parametrize("name", ["llama8b_qkv", "llama8b_gate_up", "llama8b_down", "smollm2_down"])
def test_fp8_weight_gemv_matches_fp64_on_model_shapes(name: str, m: int) -> None:
    """FP8 weight-only gemv (what Fp8Linear runs for decode) against x @ (q * s)^T in fp64."""
    pytest.importorskip("triton")
    from runtime.engine.quant.fp8 import quantize_fp8
    from runtime.kernels.gemv import gemv

    w, _ = _weight(*SHAPES[name])
    q, s = quantize_fp8(w)
    x = torch.randn(m, w.shape[1], device="cuda").to(torch.bfloat16)
    got = gemv(x, q, scale=s)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    _, exp = torch.frexp(ref)
    tol = 0.5 * torch.finfo(torch.bfloat16).eps * torch.exp2(exp.double() - 1) + 1e-4
    assert bool(((got.double() - ref).abs() <= tol).all()), (name, m, (got.double() - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_row_quantization_kernel_equals_torch_bit_for_bit(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from runtime.engine.quant.fp8 import quantize_rows_fp8
    from runtime.kernels.fp8_quant import quantize_rows

    x = (torch.randn(64, 14336, device="cuda") * torch.logspace(-4, 3, 64, device="cuda")[:, None]).to(dtype)
    x[3] = 0
    q, s = quantize_rows(x)
    rq, rs = quantize_rows_fp8(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("m", (16, 64))
@pytest.mark.parametrize("config", [(64, 128, 4, 4, True, 4), (128, 128, 8, 3, True, 8)])
def test_fp8_split_k_gemv_matches_fp64_and_is_deterministic(config: tuple, m: int) -> None:
    """The split-K configs the FP8 sweep tries (narrow W at 16-64 rows): x @ (q * s)^T in
    fp64 within the rounding of one bf16 result, and the same bits on a second call."""
    pytest.importorskip("triton")
    from runtime.engine.quant.fp8 import quantize_fp8
    from runtime.kernels.gemv import gemv
    from runtime.kernels.gemv_configs import GemvConfig

    w, _ = _weight(*SHAPES["llama8b_down"])
    q, s = quantize_fp8(w)
    x = torch.randn(m, w.shape[1], device="cuda").to(torch.bfloat16)
    cfg = GemvConfig(*config)
    got = gemv(x, q, scale=s, config=cfg)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    _, exp = torch.frexp(ref)
    tol = 0.5 * torch.finfo(torch.bfloat16).eps * torch.exp2(exp.double() - 1) + 1e-4
    assert bool(((got.double() - ref).abs() <= tol).all()), (config, m, (got.double() - ref).abs().max())
    assert torch.equal(gemv(x, q, scale=s, config=cfg), got)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", (1, 4, 16))
def test_fused_rmsnorm_and_silu_gemv_follow_the_unfused_kernels_on_8b_shapes(m: int, fp8: bool) -> None:
    """gemv_silu_mul (down) equals silu_and_mul then gemv bit for bit; gemv_rmsnorm (qkv,
    gate_up) writes x + residual bit for bit and its product is within two bf16 ulps of
    rmsnorm then gemv (the sum of squares in another order) -- with each shape's default
    config, the measured table's where it has one, and in a CUDA graph."""
    pytest.importorskip("triton")
    from runtime.engine.quant.fp8 import quantize_fp8
    from runtime.kernels.gemv import gemv, gemv_rmsnorm, gemv_silu_mul
    from runtime.kernels.rmsnorm import rmsnorm
    from runtime.kernels.silu_mul import silu_and_mul

    def weight_of(name):
        w, _ = _weight(*SHAPES[name])
        if not fp8:
            return dict(weight=w)
        q, s = quantize_fp8(w.float())
        return dict(weight=q, scale=s)

    down = weight_of("llama8b_down")
    gate_up = (torch.randn(m, 2 * 14336, device="cuda") * 2).to(torch.bfloat16)
    assert torch.equal(gemv_silu_mul(gate_up, **down), gemv(silu_and_mul(gate_up), **down))
    x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
    res = (torch.randn(m, 4096, device="cuda") * 4).to(torch.bfloat16)
    nw = (1 + torch.randn(4096, device="cuda") / 4).to(torch.bfloat16)
    for name in ("llama8b_qkv", "llama8b_gate_up"):
        w = weight_of(name)
        got, got_res = gemv_rmsnorm(x, res, nw, 1e-5, **w)
        h, want_res = rmsnorm(x.clone(), nw, 1e-5, res.clone())
        want = gemv(h, **w)
        assert torch.equal(got_res, want_res), name
        tol = 2 * torch.finfo(torch.bfloat16).eps * want.double().abs() + 1e-3
        assert bool(((got.double() - want.double()).abs() <= tol).all()), name
    graph = torch.cuda.CUDAGraph()  # static inputs, outputs from the graph's pool
    with torch.cuda.graph(graph):
        g_out, g_res = gemv_rmsnorm(x, res, nw, 1e-5, **w)
        g_down = gemv_silu_mul(gate_up, **down)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(g_out, gemv_rmsnorm(x, res, nw, 1e-5, **w)[0])
    assert torch.equal(g_res, gemv_rmsnorm(x, res, nw, 1e-5, **w)[1])
    assert torch.equal(g_down, gemv_silu_mul(gate_up, **down))


def test_engine_with_fused_gemv_prologues_keeps_greedy_tokens(tiny_model_dir: str, monkeypatch) -> None:
    """RUNTIME_GEMV_FUSE=on (RMSNorm and SiLU-mul inside the gemvs of decode rows, CUDA
    graphs on) generates what the unfused engine does, bf16, every projection on the gemv."""
    pytest.importorskip("triton")
    from runtime import Engine, SamplingParams
    from runtime.engine import kernel_dispatch as dispatch

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):", "Once upon a time"]
    runs = []
    for fuse in (False, True):
        monkeypatch.setattr(dispatch, "_GEMV", "auto")
        monkeypatch.setattr(dispatch, "_FUSE", fuse)
        eng = Engine(tiny_model_dir, device="cuda", dtype="bfloat16", attention_backend="triton", page_size=4)
        runs.append([r.token_ids for r in eng.generate(prompts, params)])
        assert dispatch._FUSE is fuse  # no fused launch failed and turned fusion off
        eng.shutdown()
        eng.core.pool.check_no_leak(0)
    same = sum(a == b for a, b in zip(*runs))
    assert same >= len(prompts) - 1, runs  # bf16: an ulp in a norm may flip a near-tie late
    assert all(a[:4] == b[:4] for a, b in zip(*runs)), runs
