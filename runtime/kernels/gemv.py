"""y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for decode-shaped x (M <= 16 rows), in one Triton
kernel that reads the nn.Linear weight W once (issue 14).

At batch 1 a projection is a pure weight stream: W's bytes over the memory bandwidth. In a
Llama-3-8B decode step on the H200, cuBLAS reached ~4.2 TB/s on gate_up but ~3.0-3.2 TB/s
on qkv and o_proj, and ran o_proj and down_proj split-K with a second (reduce) launch.

Design: one program owns BLOCK_N output columns (rows of W) and loops over all of K, so
there is no reduce launch and no atomics; the grid, cdiv(N, BLOCK_N) programs, depends only
on the shapes (CUDA-graph capturable). A config may split K instead (GemvConfig.split_k, for
FP8 weights at 16-64 rows on narrow W, where a block_n wide enough to amortize x leaves too
few programs): split_k programs per column block write fp32 partial sums that one torch sum
adds in a fixed order (no atomics: the result does not depend on scheduling). Rows of W
past N re-read row N - 1 (in bounds, so W's loads carry no mask and stay 16-byte vectors)
and are never stored.

Two inner loops (GemvConfig.dot):
* dot (default, any M): the [BLOCK_N, BLOCK_K] weight tile times x^T [BLOCK_K, BM] on the
  tensor cores, BM = next_power_of_2(M), fp32 accumulation. This is the skinny-GEMM
  "swap AB": N fills the MMA's 16-row side, and Triton pads the small M side. Triton
  software-pipelines loads that feed a dot (cp.async into shared memory, num_stages deep),
  which keeps num_stages tiles in flight per program with few registers. x's rows past M
  are masked, so they cost no memory traffic (cp.async zero-fills them).
* elementwise (M == 1 only): CUDA-core products accumulated per element in fp32 and
  reduced across K once after the loop; no dot, no shared memory, plain 16-byte loads (not
  pipelined: latency is hidden by resident programs). For M > 1 Triton 3.6 compiles the
  [M, BLOCK_N, BLOCK_K] broadcast through shared-memory layout conversions, and at M 8-16
  the fp32 FMAs (M per weight element) would need half to all of the SMs' FMA rate to keep
  up with 4.5 TB/s of bf16 weights; the tensor cores do that work for free.

Prologues (gemv_silu_mul, gemv_rmsnorm): a decode step's RMSNorm and SiLU-mul are launches
of a few microseconds each that only feed the next projection, so the gemv can compute its
input tiles itself: silu(gate) * up from the gate|up rows, or rmsnorm(x + residual) after a
first pass over its rows' K columns for 1/rms (the x tiles are L2-resident; every program
repeats that small pass instead of waiting for another launch). The first column block
also writes the new residual stream. Same rounding points as the standalone kernels.

Compiled offline with Triton 3.6 (the GPU image's) for sm_90a: the dot loops are 16-byte
cp.async weight loads, ldmatrix and mma.sync (wgmma for 64-row tiles at 16 rows), with no
local-memory spills (72-128 registers at one warp). Which config runs where is
kernels/gemv_configs.py's: reasoned defaults, and the tables benchmarks/bench_gemv.py
--sweep measures per GPU.

Rounding: the fp32 sum (plus bias) is rounded once to x's dtype, as cuBLAS's epilogue does;
the order of the K sum differs from torch's, so results can differ from F.linear's by the
usual accumulation-order error. Under Triton's interpreter bf16/fp16 tiles are upcast to
fp32 before tl.dot (its dot multiplies half-precision bit patterns as integers), and
round_to rounds to nearest even there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._common import INTERPRETED, check_dtype, check_placement, manual_bf16, round_to
from runtime.kernels.gemv_configs import FP8_WEIGHT, HALF, MAX_M, MAX_M_FP8, GemvConfig, default_config
from runtime.kernels.silu_mul import silu_times

@triton.jit
def _prologue(
    X, R, NW, RO, offs, kcol, mask, rstd, K, write,
    PRO: tl.constexpr, HAS_RES: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    """The product's input tile at `offs` (x's K columns `kcol`, `mask` its valid elements),
    computed from what the layer before left (gemv_silu_mul, gemv_rmsnorm), rounded where
    the unfused kernels round: PRO 1, silu(gate) * up of a gate|up row (up K columns after
    gate; kernels/silu_mul.py's math); PRO 2, rmsnorm(x [+ residual]) with `rstd` the row's
    (kernels/rmsnorm.py's math), and where `write` (the column block) is 0 the sum x + residual
    stored to RO."""
    dtype = X.dtype.element_ty
    if PRO == 1:
        g = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + offs + K, mask=mask, other=0.0).to(tl.float32)
        tile = silu_times(g, u, dtype, LIBDEVICE_EXP, MANUAL_BF16)
    else:
        s = _residual_sum(X, R, offs, mask, HAS_RES, MANUAL_BF16)
        if HAS_RES:
            # write: the column block's index; block 0 stores (a tensor compare: the interpreter
            # cannot AND a scalar condition into a mask)
            tl.store(RO + offs, round_to(s, dtype, MANUAL_BF16), mask=mask & ((offs * 0 + write) == 0))
        normed = round_to(s * rstd, dtype, MANUAL_BF16).to(tl.float32)
        nw = tl.load(NW + kcol, mask=mask, other=0.0).to(tl.float32)
        tile = round_to(nw * normed, dtype, MANUAL_BF16)
    return tile


@triton.jit
def _residual_sum(X, R, offs, mask, HAS_RES: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x + residual rounded to x's dtype (as torch's add), in fp32; x alone without one."""
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(s + r, X.dtype.element_ty, MANUAL_BF16).to(tl.float32)
    return s


@triton.jit
def _load_w(w_ptrs, kin, EVEN_K: tl.constexpr):
    """A [BN, BK] weight tile; `kin` [BK] masks K columns past the end unless K divides evenly."""
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=kin[None, :], other=0.0)
    return w


@triton.jit
def _gemv_kernel(
    X, W, B, S, Y,
    R, NW, RO,  # PRO 2: the residual, the norm's weight, the new residual's buffer
    eps,
    M, N, K,
    stride_xm, stride_wn, stride_ym,  # row strides; last dims are contiguous
    K_SPLIT,  # split-K: K columns per program along grid axis 1 (a multiple of BK), else K
    stride_ys,  # split-K: Y is the fp32 workspace [split, M, N], this its split stride
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT: tl.constexpr,  # split-K: grid axis 1 holds the splits, Y the fp32 workspace
    EVEN_K: tl.constexpr,  # K % BK == 0: no K mask
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # FP8 W: y = (x @ W^T) * S[N], S fp32 per output channel
    DOT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not tf32
    UPCAST: tl.constexpr,  # the interpreter's dot mishandles half-precision inputs
    MANUAL_BF16: tl.constexpr,
    PRO: tl.constexpr = 0,  # the input: 0 x itself, 1 silu(gate) * up of X's rows, 2 rmsnorm(X [+ R])
    HAS_RES: tl.constexpr = False,  # PRO 2: X + R, the sum stored to RO by the first column block
    LIBDEVICE_EXP: tl.constexpr = True,  # PRO 1: libdevice's expf (the interpreter has none)
    MANUAL_BF16_X: tl.constexpr = False,  # round_to's flag for the prologue's (x's dtype) roundings
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    write = tl.program_id(0)  # PRO 2: column block 0 stores the new residual
    rn_in = tl.minimum(rn, N - 1)  # rows past N re-read row N - 1: unmasked loads
    w_rows = W + rn_in.to(tl.int64) * stride_wn  # [BN] row starts; N * K can pass 2**31
    if SPLIT:  # this program's share of K, and its split's slice of the fp32 workspace
        split = tl.program_id(1)
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        Y += split * stride_ys
    else:  # constants: the unsplit loop compiles as it did before split-K existed
        k_lo = 0
        k_hi = K
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    if DOT:
        w_ptrs = w_rows[:, None] + (k_lo + rk)[None, :]  # [BN, BK]
        x_ptrs = X + rm[None, :] * stride_xm + (k_lo + rk)[:, None]  # [BK, BM]: x^T
        x_rows = rm[None, :] < M
        rstd = tl.full([BM], 1.0, tl.float32)
        if PRO == 2:  # each row's 1 / rms over all of K (every split needs the whole row's)
            sq = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                s = _residual_sum(X, R, rm[None, :] * stride_xm + (k0 + rk)[:, None],
                                  x_rows & ((k0 + rk) < K)[:, None], HAS_RES, MANUAL_BF16_X)
                sq += tl.sum(s * s, 0)
            rstd = tl.rsqrt(sq / K + eps)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            kin = (k0 + rk) < k_hi  # unused (compiled away) where K divides evenly and no prologue
            w = _load_w(w_ptrs, kin, EVEN_K)
            if PRO != 0:
                xt = _prologue(X, R, NW, RO, rm[None, :] * stride_xm + (k0 + rk)[:, None], (k0 + rk)[:, None],
                               x_rows & kin[:, None], rstd[None, :], K, write,
                               PRO, HAS_RES, LIBDEVICE_EXP, MANUAL_BF16_X)
            elif EVEN_K:
                xt = tl.load(x_ptrs, mask=x_rows, other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=x_rows & kin[:, None], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            elif HAS_SCALE:  # e4m3 -> x's dtype, exact (e4m3 values are bf16/fp16 values)
                w = w.to(xt.dtype)
            if IEEE:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
            w_ptrs += BK
            x_ptrs += BK
    else:  # BM == 1
        w_ptrs = w_rows[:, None] + rk[None, :]  # [BN, BK]
        x_ptrs = X + rk  # [BK]
        part = tl.zeros([BN, BK], dtype=tl.float32)  # reduced across K once, after the loop
        rstd1 = 1.0
        if PRO == 2:
            sq1 = tl.zeros([BK], dtype=tl.float32)
            for k0 in range(0, K, BK):
                s = _residual_sum(X, R, k0 + rk, (k0 + rk) < K, HAS_RES, MANUAL_BF16_X)
                sq1 += s * s
            rstd1 = tl.rsqrt(tl.sum(sq1, 0) / K + eps)
        for k0 in range(0, K, BK):
            kin = (k0 + rk) < K
            w = _load_w(w_ptrs, kin, EVEN_K)
            if PRO != 0:
                x = _prologue(X, R, NW, RO, k0 + rk, k0 + rk, kin, rstd1, K, write,
                              PRO, HAS_RES, LIBDEVICE_EXP, MANUAL_BF16_X)
            elif EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=kin, other=0.0)
            part += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BK
            x_ptrs += BK
        acc = tl.sum(part, 1)[:, None]  # [BN, 1]
    if HAS_SCALE:
        acc *= tl.load(S + rn_in)[:, None]
    if HAS_BIAS:
        if SPLIT:
            acc += tl.where(split == 0, tl.load(B + rn_in).to(tl.float32), 0.0)[:, None]  # once: the first split
        else:
            acc += tl.load(B + rn_in).to(tl.float32)[:, None]
    y_ptrs = Y + rm[None, :] * stride_ym + rn[:, None]  # [BN, BM]: y^T
    tl.store(y_ptrs, round_to(acc, Y.dtype.element_ty, MANUAL_BF16), mask=(rm[None, :] < M) & (rn[:, None] < N))


def gemv_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` should compute F.linear(x, weight) in serving: CUDA half precision,
    2-D x of 1..16 rows with a contiguous last dim, a contiguous weight of x's dtype (or FP8,
    with a scale) on x's device, and no autograd (the kernel has no backward). False under Triton's interpreter:
    the tests call `gemv` directly there."""
    return (
        not INTERPRETED
        and x.is_cuda
        and x.dim() == 2
        and weight.dim() == 2
        and 1 <= x.shape[0] <= MAX_M
        and x.dtype in HALF
        and weight.dtype in (x.dtype, FP8_WEIGHT)
        and x.shape[1] == weight.shape[1]
        and x.stride(1) == 1
        and weight.is_contiguous()
        and weight.device == x.device
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def gemv(
    x: torch.Tensor,  # [M, K], M <= 16 (64 with an FP8 weight), last dim contiguous
    weight: torch.Tensor,  # [N, K] (nn.Linear's [out, in]), x's dtype, last dim contiguous
    bias: torch.Tensor | None = None,  # [N], x's dtype
    out: torch.Tensor | None = None,  # [M, N], x's dtype, last dim contiguous
    config: GemvConfig | None = None,  # None: default_config(M, N, K)
    scale: torch.Tensor | None = None,  # [N] fp32: weight is FP8 (e4m3) and stands for weight * scale[:, None]
) -> torch.Tensor:
    """F.linear(x, weight, bias) as one kernel launch; returns `out` (or a new [M, N] tensor).
    With `scale`, an FP8 weight-only product: the e4m3 weight is widened to x's dtype in
    registers (exactly), multiplied by x on the tensor cores in fp32, and each output column
    is multiplied by its scale before the bias; x is not quantized."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    return _launch("gemv", x, x.shape[1], weight, bias, out, config, scale)


def gemv_silu_mul(
    gate_up: torch.Tensor,  # [M, 2K]: gate | up, as the fused gate|up projection leaves them
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """gemv(silu(gate) * up, weight, ...) in one launch: each program computes the SiLU
    product of the x tiles it reads (kernels/silu_mul.py's rounding, so the same input bits)
    instead of a launch of its own writing [M, K] for the next to read (issue 14: the MLP's
    down projection at decode)."""
    if gate_up.dim() != 2 or weight.dim() != 2 or gate_up.shape[1] != 2 * weight.shape[1]:
        raise ValueError(f"gemv_silu_mul: gate_up must be [M, 2K] and weight [N, K], got {tuple(gate_up.shape)} "
                         f"and {tuple(weight.shape)}")
    return _launch("gemv_silu_mul", gate_up, weight.shape[1], weight, bias, None, config, scale, pro=1)


def gemv_rmsnorm(
    x: torch.Tensor,  # [M, K] contiguous: the layer's output before the residual add
    residual: torch.Tensor | None,  # [M, K] contiguous, x's dtype; None: x is the stream itself
    norm_weight: torch.Tensor,  # [K], x's dtype
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv(rmsnorm(x + residual), weight, ...), x + residual) in one launch: each program
    computes its rows' 1/rms over all of K, then normalises the x tiles it reads
    (kernels/rmsnorm.py's rounding points); the first column block also writes the new
    residual stream (a new tensor: other programs still read the old one). Without
    `residual`, rmsnorm(x) and x itself. As with kernels/rmsnorm.py, the fp32 sum of squares
    runs in another order than torch's, which can move a normalised value by an ulp."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv_rmsnorm: x must be [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    k = x.shape[1]
    x = x.contiguous()
    if norm_weight.shape != (k,):
        raise ValueError(f"gemv_rmsnorm: norm_weight must be [K={k}], got {tuple(norm_weight.shape)}")
    check_dtype("norm_weight", norm_weight, x.dtype)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"gemv_rmsnorm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        check_dtype("residual", residual, x.dtype)
        residual = residual.contiguous()
    new_residual = torch.empty_like(x) if residual is not None else x
    out = _launch("gemv_rmsnorm", x, k, weight, bias, None, config, scale, pro=2, residual=residual,
                  norm=(norm_weight, float(eps), new_residual))
    return out, new_residual


def _launch(
    op: str, x: torch.Tensor, k: int, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
    config: GemvConfig | None, scale: torch.Tensor | None, pro: int = 0, residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The checks every entry shares and the launch: x holds the product's [M, K] input (pro
    0), a gate|up pair of it (pro 1: [M, 2K]) or what normalises to it (pro 2)."""
    m = x.shape[0]
    n = weight.shape[0]
    max_m = MAX_M if scale is None else MAX_M_FP8
    if m > max_m:
        raise ValueError(f"{op}: x has {m} rows, at most {max_m} are supported (use F.linear)")
    if k == 0:
        raise ValueError(f"{op}: K must be at least 1")
    check_dtype("x", x)
    tensors = {"x": x, "weight": weight}
    if scale is None:
        check_dtype("weight", weight, x.dtype)
    else:
        if x.dtype not in HALF:
            raise ValueError(f"{op}: an FP8 weight needs bf16 or fp16 x, got {x.dtype}")
        check_dtype("weight", weight, FP8_WEIGHT)
        if scale.shape != (n,) or scale.dtype != torch.float32:
            raise ValueError(f"{op}: scale must be fp32 [N={n}], got {scale.dtype} {tuple(scale.shape)}")
        tensors["scale"] = scale
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must be [N={n}], got {tuple(bias.shape)}")
        check_dtype("bias", bias, x.dtype)
        tensors["bias"] = bias
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        if out.shape != (m, n):
            raise ValueError(f"{op}: out must be [M={m}, N={n}], got {tuple(out.shape)}")
        check_dtype("out", out, x.dtype)
        if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError(f"{op}: out must not share memory with x (programs read x while others write out)")
        tensors["out"] = out
    if residual is not None:
        tensors["residual"] = residual
    if norm is not None:
        tensors["norm_weight"] = norm[0]
    cfg = config or default_config(m, n, k, fp8=scale is not None, device=x.device if x.is_cuda else None)
    if not cfg.dot and m != 1:
        raise ValueError(f"{op}: the elementwise config (dot=False) serves one row, x has {m}")
    check_placement(op, tensors)
    if m == 0 or n == 0:
        if residual is not None and norm is not None:  # the new residual stream is still x + residual
            norm[2].copy_(x + residual)
        return out
    # Split-K: each split's share of K a whole number of tiles (the last split may hold less).
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    y = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    nw, eps, new_residual = norm if norm is not None else (weight, 0.0, weight)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, weight, bias if bias is not None else weight, scale if scale is not None else weight, y,
        residual if residual is not None else x, nw, new_residual, eps,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(-2), k_split, y.stride(0) if splits > 1 else 0,
        BM=triton.next_power_of_2(m), BN=cfg.block_n, BK=cfg.block_k, SPLIT=splits > 1,
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, DOT=cfg.dot,
        IEEE=x.dtype == torch.float32 or INTERPRETED, UPCAST=INTERPRETED and x.dtype != torch.float32,
        MANUAL_BF16=manual_bf16(y.dtype), PRO=pro, HAS_RES=residual is not None, LIBDEVICE_EXP=not INTERPRETED,
        MANUAL_BF16_X=manual_bf16(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        out.copy_(y.sum(0))  # the splits in a fixed order, rounded once to x's dtype
    return out
