"""kernels/gemv.py run by Triton's interpreter on CPU, against an fp64 torch reference.

TRITON_INTERPRET=1 must be set before triton is imported and would change every later
Triton kernel in the process, so the kernel runs in a child process (this file run as a
script); the pytest process checks the wrapper's input validation and the serving rule.

A result must be the fp64 product rounded once to the nearest value of the dtype, up to the
fp32 accumulation: within half an ulp of the dtype at the reference value, plus 1e-5.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.unit._interp import run_cases, run_self_interpreted  # noqa: E402


def _case(name: str, dtype: torch.dtype, m: int, n: int, k: int, bias: bool, config: tuple | None,
          seed: int, device: str = "cpu") -> str | None:
    """Runs one case; returns a failure message or None. config: GemvConfig's fields, or None
    for the default."""
    from runtime.kernels.gemv import gemv
    from runtime.kernels.gemv_configs import GemvConfig

    gen = torch.Generator().manual_seed(seed)
    # x as the first K columns of a wider buffer (a row stride that is not K); values ~N(0, 1)
    # and W ~N(0, 1/K), so y ~N(0, 1).
    x = torch.randn(m, k + 5, generator=gen).to(dtype)[:, :k].to(device)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    # out as a strided view too, pre-filled with NaN: every element must be written.
    out = torch.full((m, n + 3), float("nan"), dtype=dtype, device=device)[:, :n]
    cfg = GemvConfig(*config) if config else None
    got = gemv(x, w, b, out=out, config=cfg)
    if got.data_ptr() != out.data_ptr():
        return f"{name}: the result is not written into `out`"
    ref = x.double() @ w.double().t()
    if bias:
        ref = ref + b.double()
    _, exp = torch.frexp(ref)
    tol = 0.5 * torch.finfo(dtype).eps * torch.exp2(exp.double() - 1) + 1e-5
    err = (got.double() - ref).abs()
    if got.shape != (m, n) or got.dtype != dtype:
        return f"{name}: got {got.dtype} {tuple(got.shape)}, expected {dtype} {(m, n)}"
    bad = ~(err <= tol)  # NaN included
    if bool(bad.any()):
        worst = int(torch.where(bad, err - tol, -1.0).nan_to_num(float("inf")).argmax())
        return (f"{name}: {int(bad.sum())} of {err.numel()} elements off, worst {err.flatten()[worst]:.3g} "
                f"at {divmod(worst, n)} (tolerance {tol.flatten()[worst]:.3g})")
    return None


# (name, dtype, M, N, K, bias, config or None, seed). Blocks of 16 rows and 16-128 columns:
# N and K that are not multiples of them (masked K tail, clamped rows past N), and K < BK.
CASES = [
    ("m1_bf16_default", torch.bfloat16, 1, 37, 96, False, None, 0),
    ("m3_bf16_bias_odd", torch.bfloat16, 3, 45, 77, True, (16, 32, 1, 3), 1),
    ("m16_bf16_odd", torch.bfloat16, 16, 19, 53, False, (16, 32, 1, 2), 2),
    ("m1_fp16_bias_ktail", torch.float16, 1, 33, 100, True, (16, 64, 1, 2), 3),
    ("m3_fp16_default", torch.float16, 3, 50, 64, False, None, 4),
    ("m16_fp16_bias", torch.float16, 16, 24, 40, True, (32, 16, 1, 2), 5),
    ("m1_fp32_bias", torch.float32, 1, 21, 99, True, (16, 32, 1, 2), 6),
    ("m3_fp32_default", torch.float32, 3, 17, 48, False, None, 7),
    ("m16_fp32_odd", torch.float32, 16, 9, 35, True, (16, 64, 1, 1), 8),
    ("k_below_block", torch.bfloat16, 2, 20, 11, True, (16, 64, 1, 2), 9),
    ("n_below_block", torch.bfloat16, 5, 3, 64, False, (64, 32, 4, 2), 10),
    ("block_n_8", torch.bfloat16, 8, 29, 70, True, (8, 32, 1, 2), 14),
    # The elementwise loop (M == 1): an exact and a masked K.
    ("ew_bf16_even", torch.bfloat16, 1, 19, 128, True, (4, 64, 4, 1, False), 11),
    ("ew_fp16_ktail", torch.float16, 1, 10, 83, False, (8, 32, 4, 1, False), 12),
    ("ew_fp32_ktail", torch.float32, 1, 7, 45, True, (2, 64, 4, 1, False), 13),
    # Split-K: K in 2-4 shares of whole tiles (the last shorter, masked or not), the bias added
    # once, and more splits asked than K has tiles.
    ("split2_bf16_bias_ktail", torch.bfloat16, 3, 45, 77, True, (16, 16, 1, 2, True, 2), 15),
    ("split3_fp32_bias_odd", torch.float32, 16, 9, 100, True, (16, 16, 1, 2, True, 3), 16),
    ("split4_fp16_even", torch.float16, 5, 20, 128, False, (8, 32, 1, 2, True, 4), 17),
    ("split_over_tiles", torch.bfloat16, 2, 12, 40, True, (16, 32, 1, 2, True, 4), 18),
]


def _fp8_case(name: str, dtype: torch.dtype, m: int, n: int, k: int, bias: bool, config: tuple | None,
              seed: int) -> str | None:
    """gemv(..., scale=) with an e4m3 weight and per-channel scales, against x @ (q * s)^T in
    fp64 (the same tolerance as _case: the weight's widening to x's dtype is exact)."""
    from runtime.engine.quant.fp8 import quantize_fp8
    from runtime.kernels.gemv import gemv
    from runtime.kernels.gemv_configs import GemvConfig

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q, s = quantize_fp8(torch.randn(n, k, generator=gen) * k ** -0.5 * (1 + torch.rand(n, 1, generator=gen)))
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    got = gemv(x, q, b, config=GemvConfig(*config) if config else None, scale=s)
    ref = x.double() @ (q.double() * s.double()[:, None]).t() + (b.double() if bias else 0)
    _, exp = torch.frexp(ref)
    tol = 0.5 * torch.finfo(dtype).eps * torch.exp2(exp.double() - 1) + 1e-5
    err = (got.double() - ref).abs()
    if got.shape != (m, n) or got.dtype != dtype or not bool((err <= tol).all()):
        return f"{name}: {got.dtype} {tuple(got.shape)}, worst error {err.max():.3g} (tolerance {tol.min():.3g}+)"
    return None


FP8_CASES = [
    ("fp8_m1_bf16_default", torch.bfloat16, 1, 37, 96, False, None, 20),
    ("fp8_m5_fp16_bias_ktail", torch.float16, 5, 45, 77, True, (16, 32, 1, 3), 21),
    ("fp8_m16_bf16_odd", torch.bfloat16, 16, 19, 53, True, (16, 32, 1, 2), 22),
    ("fp8_ew_bf16_ktail", torch.bfloat16, 1, 10, 83, True, (8, 32, 4, 1, False), 23),
    ("fp8_m40_bf16_wide", torch.bfloat16, 40, 24, 64, False, (16, 32, 1, 2), 24),  # BM 64: FP8 only
    ("fp8_m40_split4_bias", torch.bfloat16, 40, 24, 200, True, (32, 32, 1, 2, True, 4), 25),
    ("fp8_m16_fp16_split2_ktail", torch.float16, 16, 19, 77, True, (16, 16, 1, 2, True, 2), 26),
]


def _row_quant_case(name: str, dtype: torch.dtype, m: int, k: int, seed: int) -> str | None:
    """kernels/fp8_quant.py's one-launch row quantization equals quant/fp8.py's torch ops bit
    for bit (values, scales, an all-zero row, signed zeros, a row longer than one block)."""
    from runtime.engine.quant.fp8 import quantize_rows_fp8
    from runtime.kernels.fp8_quant import quantize_rows

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k + 3, generator=gen) * torch.logspace(-3, 3, m)[:, None]).to(dtype)[:, :k]
    x[0] = 0
    # Values that round to zero keep their sign in e4m3 (-0 is code 0x80), and -0 itself.
    x[-1, :3] = torch.tensor([-1e-7, 1e-7, -0.0], dtype=dtype) * x[-1].abs().max()
    q, s = quantize_rows(x)
    rq, rs = quantize_rows_fp8(x)
    if not torch.equal(s, rs):
        return f"{name}: scales differ by up to {(s - rs).abs().max():.3g}"
    if not torch.equal(q.view(torch.uint8), rq.view(torch.uint8)):
        return f"{name}: {int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())} of {q.numel()} codes differ"
    return None


ROW_QUANT_CASES = [
    ("rows_bf16", torch.bfloat16, 7, 2100, 30),
    ("rows_fp16_short", torch.float16, 3, 40, 31),
    ("rows_fp32", torch.float32, 4, 1024, 32),
]


def _fp8_linear_case(name: str, rows: int, gemv_breaks: bool) -> str | None:
    """Fp8Linear's serving dispatch (what it does on CUDA, here under the interpreter): at
    most 16 rows through the weight-only gemv (x @ dequantized W), more through one-launch
    row quantization and _scaled_mm (the reference's math); a gemv that raises is dropped
    for _scaled_mm, with the same results as that path."""
    from runtime.engine.quant import fp8

    torch.manual_seed(40 + rows)
    lin = fp8.Fp8Linear.from_float(torch.randn(48, 64) / 8, None)
    lin.use_scaled_mm = True  # as on CUDA (K and N are multiples of 16)
    kernels = fp8._kernels_for(torch.empty(0))
    x = torch.randn(rows, 64).to(torch.bfloat16)
    if gemv_breaks:
        kernels.gemv_ok = True
        good, kernels.gemv = kernels.gemv, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no e4m3 here"))
        try:
            got = lin(x)
        finally:
            kernels.gemv = good
        if kernels.gemv_ok:
            return f"{name}: a failing gemv was not dropped"
        kernels.gemv_ok = True
        want = lin.scaled_mm(x)
        return None if torch.equal(got, want) else f"{name}: the fallback differs from _scaled_mm's path"
    got = lin(x)
    if rows <= 16:
        ref = (x.double() @ lin.dequantize(torch.float64).t())
        tol = 0.5 * torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-5
    else:
        ref = lin.reference(x).double()
        tol = torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-4
    err = (got.double() - ref).abs()
    return None if bool((err <= tol).all()) else f"{name}: worst error {err.max():.3g}"


FP8_LINEAR_CASES = [("fp8_linear_decode", 5, False), ("fp8_linear_prefill", 40, False),
                    ("fp8_linear_gemv_fails", 3, True)]


def _fused_case(name: str, kind: str, dtype: torch.dtype, m: int, n: int, k: int, residual: bool,
                config: tuple | None, fp8: bool, seed: int) -> str | None:
    """gemv_silu_mul / gemv_rmsnorm against the unfused kernels they replace (silu_and_mul or
    rmsnorm, then gemv with the same config) under the interpreter. SiLU: the same bits.
    RMSNorm: the new residual stream bit for bit, the product within two ulps of the dtype
    (the fused sum of squares runs in another order, which can move 1/rms by an fp32 ulp and
    so a normalised input by one ulp of the dtype)."""
    from runtime.engine.quant.fp8 import quantize_fp8
    from runtime.kernels.gemv import gemv, gemv_rmsnorm, gemv_silu_mul
    from runtime.kernels.gemv_configs import GemvConfig
    from runtime.kernels.rmsnorm import rmsnorm
    from runtime.kernels.silu_mul import silu_and_mul

    gen = torch.Generator().manual_seed(seed)
    cfg = GemvConfig(*config) if config else None
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    weight, scale = quantize_fp8(w) if fp8 else (w.to(dtype), None)
    bias = torch.randn(n, generator=gen).to(dtype) if seed % 2 else None
    if kind == "silu":
        gate_up = (torch.randn(m, 2 * k + 3, generator=gen) * 2).to(dtype)[:, : 2 * k]  # a row stride not 2K
        got = gemv_silu_mul(gate_up, weight, bias, config=cfg, scale=scale)
        want = gemv(silu_and_mul(gate_up), weight, bias, config=cfg, scale=scale)
        if not torch.equal(got, want):
            return f"{name}: {int((got != want).sum())} of {got.numel()} outputs differ from the unfused kernels"
        return None
    x = torch.randn(m, k, generator=gen).to(dtype)
    res = (torch.randn(m, k, generator=gen) * 4).to(dtype) if residual else None
    nw = (1 + torch.randn(k, generator=gen) / 4).to(dtype)
    x_before, res_before = x.clone(), res.clone() if residual else None
    got, got_res = gemv_rmsnorm(x, res, nw, 1e-5, weight, bias, config=cfg, scale=scale)
    if not torch.equal(x, x_before) or (residual and not torch.equal(res, res_before)):
        return f"{name}: the fused kernel wrote into its inputs"
    if residual:
        h, want_res = rmsnorm(x.clone(), nw, 1e-5, res.clone())
        if not torch.equal(got_res, want_res):
            return f"{name}: the new residual differs from x + residual in {int((got_res != want_res).sum())} places"
    else:
        h, want_res = rmsnorm(x, nw, 1e-5), x
        if got_res is not x:
            return f"{name}: without a residual the stream is x itself"
    want = gemv(h, weight, bias, config=cfg, scale=scale)
    tol = 2 * torch.finfo(dtype).eps * want.double().abs() + 1e-4
    err = (got.double() - want.double()).abs()
    if got.shape != (m, n) or not bool((err <= tol).all()):
        return f"{name}: worst difference {err.max():.3g} from the unfused kernels"
    return None


# (name, kind, dtype, M, N, K, residual, config or None, fp8, seed): several column blocks
# (the first writes the residual), masked K tails, split-K, both loops, FP8 weights.
FUSED_CASES = [
    ("silu_m1_bf16_default", "silu", torch.bfloat16, 1, 40, 96, False, None, False, 50),
    ("silu_m3_fp16_ktail", "silu", torch.float16, 3, 45, 77, False, (16, 32, 1, 2), False, 51),
    ("silu_ew_bf16", "silu", torch.bfloat16, 1, 19, 128, False, (4, 64, 4, 1, False), False, 52),
    ("silu_split3_bf16", "silu", torch.bfloat16, 5, 20, 100, False, (8, 16, 1, 2, True, 3), False, 53),
    ("silu_fp8_ew", "silu", torch.bfloat16, 1, 24, 64, False, (8, 32, 4, 1, False), True, 54),
    ("rms_m1_bf16_ew_res", "rms", torch.bfloat16, 1, 37, 128, True, (4, 32, 4, 1, False), False, 55),
    ("rms_m5_bf16_ktail_res", "rms", torch.bfloat16, 5, 45, 77, True, (16, 32, 1, 2), False, 56),
    ("rms_m3_fp16_nores", "rms", torch.float16, 3, 33, 64, False, None, False, 57),
    ("rms_split3_bf16_res", "rms", torch.bfloat16, 4, 40, 100, True, (16, 16, 1, 2, True, 3), False, 58),
    ("rms_fp8_m16_res", "rms", torch.bfloat16, 16, 24, 64, True, (16, 32, 1, 2), True, 59),
    ("rms_fp32_m2_res", "rms", torch.float32, 2, 21, 99, True, (16, 32, 1, 2), False, 60),
    ("rms_ew_fp16_ktail_nores", "rms", torch.float16, 1, 10, 83, False, (8, 32, 4, 1, False), False, 61),
]


def _main() -> int:
    return (run_cases(CASES, _case) | run_cases(FP8_CASES, _fp8_case) | run_cases(ROW_QUANT_CASES, _row_quant_case)
            | run_cases(FP8_LINEAR_CASES, _fp8_linear_case) | run_cases(FUSED_CASES, _fused_case))


def test_gemv_matches_fp64_reference_under_interpreter() -> None:
    pytest.importorskip("triton")
    run_self_interpreted(__file__, timeout=300)


def _args(m: int = 2, n: int = 8, k: int = 16) -> dict:
    return dict(x=torch.randn(m, k, dtype=torch.bfloat16), weight=torch.randn(n, k, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(2, 3, 16, dtype=torch.bfloat16)), "x must be \\[M, K\\]"),
        (dict(weight=torch.randn(8, 12, dtype=torch.bfloat16)), "x must be \\[M, K\\] and weight \\[N, K\\]"),
        (dict(x=torch.randn(17, 16, dtype=torch.bfloat16)), "at most 16"),
        (dict(x=torch.randn(2, 0, dtype=torch.bfloat16), weight=torch.randn(8, 0, dtype=torch.bfloat16)),
         "K must be at least 1"),
        (dict(x=torch.randn(2, 16, dtype=torch.float64)), "not supported"),
        (dict(weight=torch.randn(8, 16, dtype=torch.float16)), "weight must be torch.bfloat16"),
        (dict(bias=torch.randn(7, dtype=torch.bfloat16)), "bias must be \\[N=8\\]"),
        (dict(bias=torch.randn(8)), "bias must be torch.bfloat16"),
        (dict(out=torch.empty(2, 9, dtype=torch.bfloat16)), "out must be \\[M=2, N=8\\]"),
        (dict(out=torch.empty(2, 8)), "out must be torch.bfloat16"),
        (dict(x=torch.randn(2, 32, dtype=torch.bfloat16)[:, ::2]), "x must be contiguous in its last dim"),
        (dict(weight=torch.randn(16, 8, dtype=torch.bfloat16).t()), "weight must be contiguous in its last dim"),
        (dict(scale=torch.ones(8)), "weight must be torch.float8_e4m3fn"),
        (dict(weight=torch.zeros(8, 16, dtype=torch.float8_e4m3fn), scale=torch.ones(7)), "scale must be fp32 \\[N=8\\]"),
        (dict(x=torch.randn(2, 16), weight=torch.zeros(8, 16, dtype=torch.float8_e4m3fn), scale=torch.ones(8)),
         "needs bf16 or fp16 x"),
        ({}, "needs CUDA tensors"),
    ],
)
def test_gemv_rejects_bad_input(change: dict, message: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv

    args = _args()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        gemv(**args)


def test_gemv_elementwise_config_takes_one_row() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv
    from runtime.kernels.gemv_configs import GemvConfig

    with pytest.raises(ValueError, match="serves one row, x has 2"):
        gemv(**_args(m=2), config=GemvConfig(4, 64, 4, 1, dot=False))


def test_gemv_rejects_out_aliasing_x() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv

    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must not share memory with x"):
        gemv(x, torch.randn(8, 8, dtype=torch.bfloat16), out=x)


@pytest.mark.parametrize(
    "fields, message",
    [((12, 64), "block_n must be a power of two"), ((16, 8), "block_k must be >= 16"),
     ((16, 64, 3), "num_warps must be a power of two"), ((16, 64, 1, 0), "num_stages must be >= 1"),
     ((16, 64, 1, 2, True, 0), "split_k must be >= 1"), ((4, 64, 4, 1, False, 2), "1 for the elementwise loop")],
)
def test_gemv_config_rejects_bad_tiles(fields: tuple, message: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv_configs import GemvConfig

    with pytest.raises(ValueError, match=message):
        GemvConfig(*fields)


def test_gemv_serves_only_cuda_half_precision_decode_shapes() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv import gemv_serves

    # CPU tensors of a shape it would serve on CUDA: not served (the model keeps torch).
    assert not gemv_serves(torch.randn(1, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16))


def test_default_configs_divide_k_when_they_can() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.gemv_configs import default_config

    for m, n, k in [(1, 6144, 4096), (8, 4096, 14336), (1, 960, 576), (4, 28672, 4096), (1, 100, 77)]:
        cfg = default_config(m, n, k)
        assert cfg.dot and (k % cfg.block_k == 0 or k % 16), (m, n, k, cfg)
    assert default_config(1, 6144, 4096).block_n == 16 and default_config(1, 128256, 4096).block_n == 64


def test_fp8_config_tables_are_found_by_gpu_and_capability(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels/gemv.py's measured FP8 tables: a GPU's own file, else one of the same compute
    capability, else none (the reasoned defaults); RUNTIME_GEMV_FP8_CONFIGS overrides; the
    table decides configs and Fp8Linear's row limit, looked up once per device."""
    pytest.importorskip("triton")
    from runtime.kernels import gemv_configs as gemv

    cfg = {"block_n": 32, "block_k": 512, "num_warps": 1, "num_stages": 3, "dot": True}
    (tmp_path / "gemv_fp8_Other_GPU.sm90.json").write_text(json.dumps({"6144x4096@1": cfg, "max_rows": 64}))
    (tmp_path / "gemv_fp8_Old_GPU.sm80.json").write_text(json.dumps({"max_rows": 1}))
    name = ["Fake GPU"]
    reads = []
    real_read = gemv._read_table
    monkeypatch.setattr(gemv, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(gemv, "_TUNED", {})
    monkeypatch.setattr(gemv, "_read_table", lambda kind, i: reads.append((kind, i)) or real_read(kind, i))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.delenv("RUNTIME_GEMV_FP8_CONFIGS", raising=False)

    assert gemv.default_config(1, 6144, 4096, fp8=True) == gemv.GemvConfig(**cfg)  # same capability's table
    assert gemv.fp8_max_rows() == 64
    assert gemv.default_config(1, 6144, 4096) == gemv.GemvConfig(16, 256, 1, 4)  # bf16: never from the table
    assert gemv.default_config(1, 4096, 4096, fp8=True) == gemv.GemvConfig(16, 256, 1, 4)  # shape not in it
    assert reads == [("fp8", 0)]  # once per device
    (tmp_path / "own.json").write_text(json.dumps({"max_rows": 8}))
    monkeypatch.setenv("RUNTIME_GEMV_FP8_CONFIGS", str(tmp_path / "own.json"))
    assert gemv.fp8_max_rows() == 8
    monkeypatch.delenv("RUNTIME_GEMV_FP8_CONFIGS")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))
    monkeypatch.setattr(gemv, "_TUNED", {})
    assert gemv.fp8_tuned() == {} and gemv.fp8_max_rows() == gemv.MAX_M  # no table of this capability


def test_fp8_table_answers_per_shape_which_kernel_serves(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_gemv_fp8.py writes, per shape and row bucket, the best gemv config or "torch"
    where _scaled_mm was faster; fp8_uses_gemv reads it back (None where the table is
    silent, then Fp8Linear keeps the max_rows rule). Rows from an H100 sweep: at 16 rows
    the gemv won on qkv, o_proj and down but not on gate_up, which a single max_rows had
    turned into _scaled_mm for all four."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_gemv_fp8 import tuned_table

    from runtime.kernels import gemv_configs as gemv

    one = {"block_n": 8, "block_k": 512, "num_warps": 2, "num_stages": 1, "dot": False, "split_k": 1}
    dot = {"block_n": 32, "block_k": 256, "num_warps": 2, "num_stages": 3, "dot": True, "split_k": 4}
    rows = [dict(n=6144, k=4096, m=1, best_us=11.9, scaled_mm_us=22.8, best_config=one),
            dict(n=6144, k=4096, m=16, best_us=18.2, scaled_mm_us=21.8, best_config=dot),
            dict(n=28672, k=4096, m=1, best_us=43.1, scaled_mm_us=53.6, best_config=dict(one, block_n=4)),
            dict(n=28672, k=4096, m=16, best_us=54.4, scaled_mm_us=53.0, best_config=dot)]
    table = tuned_table(rows)
    assert table["max_rows"] == 1  # gate_up lost at 16 rows
    assert table["6144x4096@16"] == dot and table["28672x4096@16"] == "torch" and table["28672x4096@8"] == "torch"
    assert table["6144x4096@1"] == one and "6144x4096@2" not in table  # the elementwise loop takes one row
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv("RUNTIME_GEMV_FP8_CONFIGS", str(tmp_path / "t.json"))
    monkeypatch.setattr(gemv, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert gemv.fp8_uses_gemv(16, 6144, 4096) is True and gemv.fp8_uses_gemv(9, 6144, 4096) is True
    assert gemv.fp8_uses_gemv(16, 28672, 4096) is False and gemv.fp8_uses_gemv(1, 28672, 4096) is True
    assert gemv.fp8_uses_gemv(2, 6144, 4096) is None  # no one-row config serves 2 rows: the max_rows rule
    assert gemv.fp8_uses_gemv(16, 4096, 4096) is None and gemv.fp8_uses_gemv(65, 6144, 4096) is False
    # An older table (configs without "torch" marks: the best gemv whether or not it won) says nothing.
    (tmp_path / "t.json").write_text(json.dumps({k: v for k, v in table.items() if k != "per_shape"}))
    monkeypatch.setattr(gemv, "_TUNED", {})
    assert gemv.fp8_uses_gemv(16, 6144, 4096) is None and gemv.fp8_uses_gemv(1, 6144, 4096) is None


def test_bf16_config_table_names_a_config_cublas_or_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured half-precision table (bench_gemv.py --tuned-out): a config where a gemv
    won, "torch" where cuBLAS did, None where the shape or row bucket was not measured or
    the config cannot serve the rows (the elementwise loop takes one row); the FP8 table is
    a separate file."""
    pytest.importorskip("triton")
    from runtime.kernels import gemv_configs as gemv

    ew = {"block_n": 4, "block_k": 1024, "num_warps": 4, "num_stages": 1, "dot": False, "split_k": 1}
    dot = {"block_n": 32, "block_k": 256, "num_warps": 1, "num_stages": 3, "dot": True, "split_k": 1}
    table = {"6144x4096@1": ew, "6144x4096@16": dot, "49152x4096@1": "torch", "6144x4096@2": ew}
    (tmp_path / "gemv_bf16_Some_GPU.sm90.json").write_text(json.dumps(table))
    monkeypatch.setattr(gemv, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(gemv, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.delenv("RUNTIME_GEMV_BF16_CONFIGS", raising=False)

    assert gemv.bf16_choice(1, 6144, 4096) == gemv.GemvConfig(**ew)
    assert gemv.bf16_choice(12, 6144, 4096) == gemv.GemvConfig(**dot)  # 12 rows: the 16-row bucket
    assert gemv.bf16_choice(2, 6144, 4096) is None  # elementwise cannot take 2 rows
    assert gemv.bf16_choice(4, 6144, 4096) is None  # bucket not measured
    assert gemv.bf16_choice(1, 49152, 4096) == "torch"
    assert gemv.bf16_choice(1, 4096, 4096) is None  # shape not measured
    assert gemv.fp8_tuned() == {}  # no FP8 file: the bf16 one is not read for FP8
    monkeypatch.setenv("RUNTIME_GEMV_BF16_CONFIGS", str(tmp_path / "missing.json"))
    assert gemv.bf16_choice(1, 6144, 4096) is None


if __name__ == "__main__":
    sys.exit(_main())
