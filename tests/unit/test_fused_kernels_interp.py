"""The fused Triton kernels (rmsnorm, rope_store_kv, silu_and_mul, lm_head_topk, and the
draft tree's tree_grow and tree_select), run by Triton's
interpreter on CPU, against the model's torch path (runtime.engine.model).

TRITON_INTERPRET=1 must be set before triton is imported and would change every later
Triton kernel in the process, so the kernels run in a child process per kernel (this file
run as a script: `python tests/unit/test_fused_kernels_interp.py rope`); the pytest process
only checks the wrappers' input validation.

Rounding points match torch's, so rotary and the KV store must be bit-identical in half
precision. RMSNorm sums squares in another order and the interpreter's exp is numpy's, so
there a half-precision element may be one ulp off, but only rarely; fp32 within 1e-5.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, exact: bool) -> str | None:
    """None when got matches ref: fp32 within 1e-5; half precision bit-identical when
    `exact`, else every element within one ulp and at most 1 + numel/200 of them off."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{name}: got {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
    diff = (got.float() - ref.float()).abs()
    if ref.dtype == torch.float32:
        if not torch.allclose(got, ref, rtol=1e-5, atol=1e-5):
            return f"{name}: max abs error {diff.max().item():.3g} (fp32, tolerance 1e-5)"
        return None
    off = int((diff > 0).sum())
    if exact and off:
        return f"{name}: {off} of {ref.numel()} elements differ (max {diff.max().item():.3g}), expected bit-identical"
    finfo = torch.finfo(ref.dtype)
    _, exp = torch.frexp(torch.maximum(got.float().abs(), ref.float().abs()))
    ulp = (finfo.eps * torch.exp2(exp.float() - 1)).clamp_min(finfo.smallest_normal * finfo.eps)
    beyond = int((diff > ulp).sum())
    if beyond or off > 1 + ref.numel() // 200:
        return f"{name}: {off} of {ref.numel()} elements differ, {beyond} by more than one ulp"
    return None


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _rmsnorm_case(name: str, dtype: torch.dtype, t: int, h: int, seed: int, device: str = "cpu") -> str | None:
    from runtime.kernels.rmsnorm import rmsnorm
    from runtime.engine.model import RMSNorm

    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(h, EPS).to(dtype)
    norm.weight.data = (_randn(gen, h, dtype=dtype, scale=0.5) + 1).to(device)
    # x as the first H columns of a wider buffer: a row stride that is not H.
    x = _randn(gen, t, h + 8, dtype=dtype, scale=3.0).to(device)[:, :h]
    residual = _randn(gen, t, h, dtype=dtype).to(device)
    with torch.no_grad():  # the torch recipe itself (on CUDA, norm(x) would run the kernel)
        ref_plain = norm._norm(x)
        ref_s = x + residual
        ref_y = norm._norm(ref_s)
    got = rmsnorm(x, norm.weight.data, EPS)
    fails = [_compare(f"{name} plain", got, ref_plain, exact=False)]
    x_in, res_in = x.clone(), residual.clone()
    got_y, got_s = rmsnorm(x_in, norm.weight.data, EPS, res_in)
    if got_y.data_ptr() != x_in.data_ptr() or got_s.data_ptr() != res_in.data_ptr():
        fails.append(f"{name}: with a residual, the results must be x and residual, updated in place")
    fails += [_compare(f"{name} residual sum", res_in, ref_s, exact=True),
              _compare(f"{name} residual norm", x_in, ref_y, exact=False)]
    return "; ".join(f for f in fails if f) or None


def _rope_case(
    name: str, dtype: torch.dtype, t: int, hq: int, hkv: int, d: int, cos_3d: bool, seed: int,
    kv_dtype: torch.dtype | None = None,  # an FP8 cache: K and V rounded to it as torch rounds them
    device: str = "cpu",
) -> str | None:
    from runtime.kernels.rope_kv import rope_store_kv
    from runtime.engine.kv_pool import KVPool
    from runtime.engine.model import apply_rotary

    gen = torch.Generator().manual_seed(seed)
    page_size, layer = 16, 1
    kv_dtype = kv_dtype or dtype
    pool = KVPool(2, 6, page_size, hkv, d, kv_dtype, device)
    pool.kv.copy_(_randn(gen, *pool.kv.shape, dtype=dtype).to(kv_dtype))
    # Distinct slots scattered over pages 1..5 (page 0 is the padding page), as a strided
    # view (EAGLE's draft steps pass one row of a table).
    slots = (torch.randperm(5 * page_size, generator=gen)[:t] + page_size).to(device, torch.int64)
    slots = torch.stack((slots, torch.zeros_like(slots)), dim=1)[:, 0]
    qkv = _randn(gen, t, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0).to(device)
    positions = torch.randint(0, 4096, (t,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = (positions.float()[:, None] * inv_freq[None, :]).repeat(1, 2)  # cat(freqs, freqs)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    if cos_3d:
        cos, sin = cos[:, None, :], sin[:, None, :]
    before = pool.kv.clone()

    q = rope_store_kv(qkv, cos, sin, pool.k_cache(layer), pool.v_cache(layer), slots, hq, hkv, d)

    q_ref, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    cos3, sin3 = cos.reshape(t, 1, d), sin.reshape(t, 1, d)
    q_ref = apply_rotary(q_ref.reshape(t, hq, d), cos3, sin3)
    k_ref = apply_rotary(k.reshape(t, hkv, d), cos3, sin3)
    page, pos = slots // page_size, slots % page_size
    expected = before.clone()
    expected[page, layer, 0, pos] = k_ref.to(kv_dtype)
    expected[page, layer, 1, pos] = v.reshape(t, hkv, d).to(kv_dtype)
    kv_exact = True
    if kv_dtype != dtype and device == "cpu":
        # Triton's interpreter rounds to e4m3 its own way: ties away from zero (4.25 -> 4.5,
        # torch: 4.0), and without carrying into the exponent (7.94 -> 4, not 8). Under it the
        # FP8 cache must be within one e4m3 step but for that carry; on CUDA (cvt.rn, nearest
        # even) every value must equal torch's rounding.
        got_f, exp_f = pool.kv.float(), expected.float()
        carry_bug = (got_f * 2 == exp_f) & (torch.frexp(exp_f)[0].abs() == 0.5)
        pool.kv[carry_bug] = expected[carry_bug]
        kv_exact = False
    fails = [_compare(f"{name} q", q, q_ref, exact=True), _compare(f"{name} kv pool", pool.kv, expected, exact=kv_exact)]
    if not q.is_contiguous():
        fails.append(f"{name}: q must be contiguous, strides {q.stride()}")
    written = torch.zeros(pool.kv.shape[:4], dtype=torch.bool, device=device)
    written[page, layer, :, pos] = True
    if not torch.equal(pool.kv[~written].float(), before[~written].float()):
        fails.append(f"{name}: a cache entry outside the tokens' slots changed")
    return "; ".join(f for f in fails if f) or None


def _silu_case(name: str, dtype: torch.dtype, t: int, inter: int, seed: int, device: str = "cpu") -> str | None:
    import torch.nn.functional as F

    from runtime.kernels.silu_mul import silu_and_mul

    gen = torch.Generator().manual_seed(seed)
    gate_up = _randn(gen, t, 2 * inter, dtype=dtype, scale=4.0)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0]).to(dtype)  # saturated ends, zero
    gate_up = gate_up.to(device)
    gate, up = gate_up.chunk(2, dim=-1)
    return _compare(name, silu_and_mul(gate_up), F.silu(gate) * up, exact=False)


def _lm_head_case(name: str, dtype: torch.dtype, m: int, v: int, h: int, k: int, with_ids: bool, seed: int,
                  device: str = "cpu") -> str | None:
    """The k best tokens and their log-probabilities (and raw logits) against torch's topk
    and logsumexp over fp32 logits of the same inputs. Random inputs have no near-ties."""
    from runtime.kernels.lm_head_topk import lm_head_topk

    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, m, h + 8, dtype=dtype).to(device)[:, :h]  # a row stride that is not H
    w = _randn(gen, v, h, dtype=dtype, scale=0.2).to(device)
    ids = torch.randperm(4 * v, generator=gen)[:v].to(device) if with_ids else None
    logits = x.float() @ w.float().T
    ref_vals, ref_cols = logits.topk(k, dim=-1)
    ref_toks = ids[ref_cols] if with_ids else ref_cols
    fails = []
    for logprobs in (True, False):
        vals, toks = lm_head_topk(x, w, k, ids, logprobs)
        want = ref_vals - logits.logsumexp(-1, keepdim=True) if logprobs else ref_vals
        if vals.dtype != torch.float32 or toks.dtype != torch.int64 or vals.shape != (m, k):
            fails.append(f"{name}: got {vals.dtype} {toks.dtype} {tuple(vals.shape)}, expected fp32, int64 ({m}, {k})")
        elif not torch.equal(toks, ref_toks):
            fails.append(f"{name} logprobs={logprobs}: tokens {toks.tolist()} != {ref_toks.tolist()}")
        elif not torch.allclose(vals, want, rtol=1e-4, atol=1e-4):
            fails.append(f"{name} logprobs={logprobs}: values off by {(vals - want).abs().max().item():.3g}")
    return "; ".join(fails) or None


def _tree_case(name: str, n: int, branch: int, depth: int, nodes: int, certain: bool, seed: int,
               device: str = "cpu") -> str | None:
    """TreeBuilder on the kernels against its torch path, fed the same children: every
    frontier and the final pick (tokens, parents, depths, ancestor bits) identical.
    `certain` gives some children log-probability 0, so they tie their parent's score."""
    from runtime.engine.speculative.tree import TreeBuilder

    gen = torch.Generator().manual_seed(seed)

    def children(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        logp = -torch.rand(*shape, generator=gen) * 6
        if certain:
            logp[..., 0] = torch.where(torch.rand(shape[:-1], generator=gen) < 0.3, 0.0, logp[..., 0])
        logp = logp.sort(-1, descending=True).values  # siblings best first, as top_logprobs gives them
        tokens = torch.stack([torch.randperm(1000, generator=gen)[: shape[-1]] for _ in range(logp[..., 0].numel())])
        return logp.to(device), tokens.view(shape).to(device)

    ref, got = TreeBuilder(branch, depth, kernels=False), TreeBuilder(branch, depth, kernels=True)
    first = children((n, branch))
    fronts = [(ref.start(*first), got.start(*first))]
    for _ in range(depth - 1):
        kids = children((n, branch, branch))
        fronts.append((ref.grow(*kids), got.grow(*kids)))
    fails = []
    for d, (a, b) in enumerate(fronts):
        if not (torch.equal(a.tokens, b.tokens) and torch.equal(a.parent, b.parent)):
            fails.append(f"{name}: frontier at depth {d + 1} differs: {b.tokens.tolist()} / {b.parent.tolist()}, "
                         f"expected {a.tokens.tolist()} / {a.parent.tolist()}")
    for label, a, b in zip(("tokens", "parents", "depths", "bits"), ref.select(nodes), got.select(nodes)):
        if not torch.equal(a, b):
            fails.append(f"{name}: selected {label} {b.tolist()}, expected {a.tolist()}")
    return "; ".join(fails) or None


# Per kernel: the case function and its cases (name first, then its arguments).
CASES = {
    # name, dtype, T, H, seed. H 576 (SmolLM2) is not a power of two.
    "rmsnorm": (_rmsnorm_case, [
        ("rms_bf16_576", torch.bfloat16, 7, 576, 0),
        ("rms_bf16_64", torch.bfloat16, 1, 64, 1),
        ("rms_fp16_4096", torch.float16, 3, 4096, 2),
        ("rms_fp32_576", torch.float32, 3, 576, 3),
        ("rms_fp32_100", torch.float32, 1, 100, 4),
    ]),
    # name, dtype, T, Hq, Hkv, D, cos as [T, 1, D], seed. 9 + 3 heads: one program holds both
    # a query head and KV heads.
    "rope": (_rope_case, [
        ("rope_bf16_gqa3_d64", torch.bfloat16, 7, 9, 3, 64, True, 10),
        ("rope_fp16_gqa3_d64", torch.float16, 3, 9, 3, 64, False, 11),
        ("rope_fp32_gqa3_d64", torch.float32, 7, 9, 3, 64, True, 12),
        ("rope_bf16_gqa4_d128", torch.bfloat16, 1, 4, 1, 128, False, 13),
        ("rope_fp32_mha_d96", torch.float32, 3, 2, 2, 96, True, 14),
        ("rope_bf16_fp8kv_gqa3_d64", torch.bfloat16, 7, 9, 3, 64, True, 15, torch.float8_e4m3fn),
        ("rope_fp16_fp8kv_gqa4_d128", torch.float16, 3, 4, 1, 128, False, 16, torch.float8_e4m3fn),
    ]),
    # name, dtype, T, I, seed. I 1536 spans three blocks; 100 is a ragged one.
    "silu": (_silu_case, [
        ("silu_bf16_1536", torch.bfloat16, 7, 1536, 20),
        ("silu_fp16_576", torch.float16, 3, 576, 21),
        ("silu_fp32_100", torch.float32, 1, 100, 22),
        ("silu_bf16_64", torch.bfloat16, 3, 64, 23),
    ]),
    # name, dtype, M, V, H, k, draft vocabulary ids, seed. V not a multiple of the vocabulary
    # block (the last block is ragged); M 17 spans two row blocks; H 576 is 9 H-blocks.
    "lm_head": (_lm_head_case, [
        ("lm_bf16_chain", torch.bfloat16, 1, 1000, 576, 1, False, 30),
        ("lm_bf16_tree_ids", torch.bfloat16, 17, 700, 64, 8, True, 31),
        ("lm_fp32_k16", torch.float32, 3, 300, 100, 16, False, 32),
        ("lm_fp16_k4", torch.float16, 2, 129, 32, 4, True, 33),
    ]),
    # name, trees, branch, depth, max nodes, certain children, seed. 8x48 at depth 6: 328
    # candidates; branch 1 is a chain; 63 nodes is the most a tree may keep.
    "tree": (_tree_case, [
        ("tree_8x48_d6", 2, 8, 6, 48, False, 40),
        ("tree_4x16_d5_certain", 3, 4, 5, 16, True, 41),
        ("tree_3x63_d4", 1, 3, 4, 63, True, 42),
        ("tree_chain_d5", 2, 1, 5, 5, False, 43),
        ("tree_2x5_d1", 2, 2, 1, 5, False, 44),
    ]),
}


def _run_cases(kernel: str) -> int:
    fn, cases = CASES[kernel]
    failures = []
    for case in cases:
        start = time.perf_counter()
        msg = fn(*case, device="cpu")  # as tests/gpu/test_fused_kernels_gpu.py calls it, with "cuda"
        failures += [msg] if msg else []
        print(f"{case[0]}: {msg or 'ok'} ({time.perf_counter() - start:.2f} s)", flush=True)
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


@pytest.mark.parametrize("kernel", list(CASES))
def test_fused_kernel_matches_torch_reference_under_interpreter(kernel: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, kernel], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rmsnorm_args(**change: object) -> dict:
    args = dict(x=torch.randn(3, 16), weight=torch.ones(16), eps=EPS, residual=torch.randn(3, 16))
    return {**args, **change}


def _rope_args(**change: object) -> dict:
    t, hq, hkv, d = 3, 4, 2, 8
    args = dict(
        qkv=torch.randn(t, (hq + 2 * hkv) * d), cos=torch.randn(t, 1, d), sin=torch.randn(t, 1, d),
        k_cache=torch.randn(4, 16, hkv, d), v_cache=torch.randn(4, 16, hkv, d),
        out_slots=torch.arange(t, dtype=torch.int64), num_heads=hq, num_kv_heads=hkv, head_dim=d,
    )
    return {**args, **change}


def _silu_args(**change: object) -> dict:
    return {"gate_up": torch.randn(3, 32), **change}


def _grow_args(**change: object) -> dict:
    n, b = 2, 3
    args = dict(front_score=torch.zeros(n, b), front_index=torch.zeros(n, b, dtype=torch.int64),
                logp=torch.zeros(n, b, b), tokens=torch.zeros(n, b, b, dtype=torch.int64),
                cand_tok=torch.zeros(n, 12, dtype=torch.int64), cand_score=torch.zeros(n, 12),
                cand_par=torch.zeros(n, 12, dtype=torch.int64), count=3)
    return {**args, **change}


def _select_args(**change: object) -> dict:
    args = dict(cand_tok=torch.zeros(2, 12, dtype=torch.int64), cand_score=torch.zeros(2, 12),
                cand_par=torch.zeros(2, 12, dtype=torch.int64), count=12, branch=3, max_depth=2, max_nodes=8,
                tie_eps=1e-9)
    return {**args, **change}


def _lm_args(**change: object) -> dict:
    return {"hidden": torch.randn(2, 16), "weight": torch.randn(40, 16), "k": 4, **change}


_META = torch.device("meta")
_SHARED = torch.randn(3, 16)
BAD_INPUTS = [
    ("rmsnorm", _rmsnorm_args(x=torch.randn(3, 16, dtype=torch.float64), weight=torch.ones(16, dtype=torch.float64),
                              residual=None), "x dtype torch.float64 not supported"),
    ("rmsnorm", _rmsnorm_args(weight=torch.ones(16, dtype=torch.bfloat16)), "weight must be torch.float32"),
    ("rmsnorm", _rmsnorm_args(weight=torch.ones(8)), "weight must be \\[H=16\\]"),
    ("rmsnorm", _rmsnorm_args(x=torch.randn(1, 3, 16)), "x must be \\[T, H\\]"),
    ("rmsnorm", _rmsnorm_args(x=torch.randn(3, 32)[:, ::2]), "x must be contiguous in its last dim"),
    ("rmsnorm", _rmsnorm_args(residual=torch.randn(2, 16)), "differ in shape"),
    ("rmsnorm", _rmsnorm_args(residual=torch.randn(3, 16, device=_META)), "all tensors must be on one device"),
    ("rmsnorm", _rmsnorm_args(x=_SHARED, residual=_SHARED), "residual and x must be different tensors"),
    ("rmsnorm", {**_rmsnorm_args(), "residual": None}, "needs CUDA tensors"),
    ("rope", _rope_args(qkv=torch.randn(3, 60)), "qkv must be \\[T, \\(Hq \\+ 2 \\* Hkv\\) \\* D = 64\\]"),
    ("rope", _rope_args(qkv=torch.randn(3, 64, dtype=torch.float64)), "qkv dtype torch.float64 not supported"),
    ("rope", _rope_args(cos=torch.randn(3, 4)), "cos must be \\[T=3, D=8\\]"),
    ("rope", _rope_args(sin=torch.randn(3, 8, dtype=torch.bfloat16)), "sin must be torch.float32"),
    ("rope", _rope_args(k_cache=torch.randn(4, 16, 1, 8)), "k_cache must be \\[num_pages, page_size, Hkv=2, D=8\\]"),
    ("rope", _rope_args(v_cache=torch.randn(4, 8, 2, 8)), "differ in shape"),
    ("rope", _rope_args(v_cache=torch.randn(4, 16, 2, 16)[..., ::2]), "v_cache must be contiguous in its last dim"),
    ("rope", _rope_args(out_slots=torch.arange(3, dtype=torch.int32)), "out_slots must be torch.int64"),
    ("rope", _rope_args(out_slots=torch.arange(2)), "out_slots must be \\[T=3\\]"),
    ("rope", _rope_args(k_cache=torch.randn(4, 16, 2, 8, device=_META)), "all tensors must be on one device"),
    ("rope", _rope_args(head_dim=7, qkv=torch.randn(3, 56)), "even head_dim"),
    ("rope", _rope_args(), "needs CUDA tensors"),
    ("silu", _silu_args(gate_up=torch.randn(3, 31)), "gate_up must be \\[T, 2 \\* I\\]"),
    ("silu", _silu_args(gate_up=torch.ones(3, 32, dtype=torch.int32)), "gate_up dtype torch.int32 not supported"),
    ("silu", _silu_args(gate_up=torch.randn(3, 64)[:, ::2]), "gate_up must be contiguous in its last dim"),
    ("silu", _silu_args(), "needs CUDA tensors"),
    ("lm_head", _lm_args(hidden=torch.randn(2, 8)), "hidden must be \\[M, H\\] and weight \\[V, H\\]"),
    ("lm_head", _lm_args(weight=torch.randn(40, 16, dtype=torch.bfloat16)), "weight must be torch.float32"),
    ("lm_head", _lm_args(k=0), "k must be in \\[1, min\\(16, V=40\\)\\]"),
    ("lm_head", _lm_args(k=17), "k must be in"),
    ("lm_head", _lm_args(weight=torch.randn(3, 16), k=4), "V=3"),
    ("lm_head", _lm_args(ids=torch.arange(40, dtype=torch.int32)), "ids must be int64 \\[V=40\\]"),
    ("lm_head", _lm_args(ids=torch.arange(39)), "ids must be int64 \\[V=40\\]"),
    ("lm_head", _lm_args(weight=torch.randn(40, 32)[:, ::2]), "weight must be contiguous in its last dim"),
    ("lm_head", _lm_args(weight=torch.randn(40, 16, device=_META)), "all tensors must be on one device"),
    ("lm_head", _lm_args(), "needs CUDA tensors"),
    ("tree_grow", _grow_args(logp=torch.zeros(2, 3, 2)), "logp and tokens \\[N, b, b\\]"),
    ("tree_grow", _grow_args(count=4), "C >= count \\+ b\\*b = 13"),
    ("tree_grow", _grow_args(cand_par=torch.zeros(2, 11, dtype=torch.int64)), "candidate buffers must be"),
    ("tree_grow", _grow_args(tokens=torch.zeros(2, 3, 3, dtype=torch.int32)), "tokens must be contiguous torch.int64"),
    ("tree_grow", _grow_args(), "needs CUDA tensors"),
    ("tree_select", _select_args(count=13), "count <= C=12"),
    ("tree_select", _select_args(max_nodes=64), "max_nodes <= 63"),
    ("tree_select", _select_args(cand_score=torch.zeros(2, 12, dtype=torch.float64)), "cand_score must be"),
    ("tree_select", _select_args(cand_par=torch.zeros(2, 11, dtype=torch.int64)), "one \\[N, C\\] shape"),
    ("tree_select", _select_args(), "needs CUDA tensors"),
]


@pytest.mark.parametrize("op, args, message", BAD_INPUTS)
def test_fused_kernels_reject_bad_input(op: str, args: dict, message: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.lm_head_topk import lm_head_topk
    from runtime.kernels.rmsnorm import rmsnorm
    from runtime.kernels.rope_kv import rope_store_kv
    from runtime.kernels.silu_mul import silu_and_mul
    from runtime.kernels.tree_grow import tree_grow
    from runtime.kernels.tree_select import tree_select

    fn = {"rmsnorm": rmsnorm, "rope": rope_store_kv, "silu": silu_and_mul, "lm_head": lm_head_topk,
          "tree_grow": tree_grow, "tree_select": tree_select}[op]
    with pytest.raises(ValueError, match=message):
        fn(**args)


if __name__ == "__main__":
    sys.exit(_run_cases(sys.argv[1]))
