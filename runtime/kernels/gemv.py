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
local-memory spills (72-128 registers at one warp). The configs are reasoned, not measured:
benchmarks/bench_gemv.py --sweep times every candidate on the 8B shapes.

Rounding: the fp32 sum (plus bias) is rounded once to x's dtype, as cuBLAS's epilogue does;
the order of the K sum differs from torch's, so results can differ from F.linear's by the
usual accumulation-order error. Under Triton's interpreter bf16/fp16 tiles are upcast to
fp32 before tl.dot (its dot multiplies half-precision bit patterns as integers), and
round_to rounds to nearest even there.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from runtime.kernels._common import INTERPRETED, check_dtype, check_placement, manual_bf16, round_to
from runtime.kernels.silu_mul import silu_times

MAX_M = 16  # rows of x one program holds (BM <= 16); wider x is a GEMM, torch's job
# An FP8 weight reads half the bytes, so the product stays bound by them to more rows; the
# kernel takes up to this many there (Fp8Linear decides up to where it serves).
MAX_M_FP8 = 64
HALF = (torch.float16, torch.bfloat16)
FP8_WEIGHT = torch.float8_e4m3fn  # gemv(..., scale=): FP8 weight-only (quant/fp8.py's Fp8Linear)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows of W (output columns) per program, a power of two
    block_k: int  # columns of K per loop step, a power of two >= 16
    num_warps: int = 1
    num_stages: int = 4  # pipelined loads in flight (the dot loop); ignored by the elementwise loop
    dot: bool = True  # tensor-core tile (any M); False: elementwise (M == 1 only)
    # Programs per column block, each over its share of K (dot only): partial sums go to an
    # fp32 workspace [split_k, M, N] that torch sums in a fixed order (deterministic), then
    # rounds to x's dtype. For narrow W (N = 4096) at M 16-64, where cdiv(N, block_n)
    # programs are too few to keep the weight stream going at a block_n that amortizes x.
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig: {name} must be a power of two, got {v}")
        if self.block_k < 16:
            raise ValueError(f"GemvConfig: block_k must be >= 16, got {self.block_k}")
        if self.num_stages < 1:
            raise ValueError(f"GemvConfig: num_stages must be >= 1, got {self.num_stages}")
        if self.split_k < 1 or (self.split_k > 1 and not self.dot):
            raise ValueError(f"GemvConfig: split_k must be >= 1, and 1 for the elementwise loop, got {self.split_k}")


# Measured configs, one file per GPU and weight kind under configs/: FP8 weights
# (gemv_fp8_<GPU name>.<smXY>.json, from benchmarks/bench_gemv_fp8.py --tuned-out) and
# half-precision weights (gemv_bf16_<GPU name>.<smXY>.json, from benchmarks/bench_gemv.py
# --tuned-out), used by that GPU or (when it has none of its own) by another of the same
# compute capability; RUNTIME_GEMV_FP8_CONFIGS / RUNTIME_GEMV_BF16_CONFIGS name a file.
# A file holds, per "NxK@BM" (BM = next_power_of_2(rows): 1, 2, 4, ... 64), the fastest
# config measured at the nearest measured row count; in a bf16 file the entry is "torch"
# where cuBLAS beat every config (model.linear then keeps F.linear). An FP8 file also holds
# "max_rows": up to how many rows the gemv beat row quantization + torch._scaled_mm on every
# shape (Fp8Linear's dispatch).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TABLE_ENV = {"fp8": "RUNTIME_GEMV_FP8_CONFIGS", "bf16": "RUNTIME_GEMV_BF16_CONFIGS"}
_TUNED: dict[str, dict] = {}


def tuned_table(kind: str, device: torch.device | int | None = None) -> dict:
    """The measured gemv configs of `kind` ("fp8" or "bf16") for this GPU ({} when none were
    measured). Looked up once per device (an eager step calls this for every projection)."""
    if not torch.cuda.is_available():
        return {}
    if isinstance(device, int):
        index = device
    elif device is None or device.index is None:
        index = torch.cuda.current_device()
    else:
        index = device.index
    key = f"{kind}:{index}:{os.environ.get(TABLE_ENV[kind], '')}"
    table = _TUNED.get(key)
    if table is None:
        table = _TUNED[key] = _read_table(kind, index)
    return table


def fp8_tuned(device: torch.device | int | None = None) -> dict:
    return tuned_table("fp8", device)


def _read_table(kind: str, index: int) -> dict:
    name = os.environ.get(TABLE_ENV[kind])
    if not name:
        gpu = torch.cuda.get_device_name(index).replace(" ", "_")
        cap = "sm%d%d" % torch.cuda.get_device_capability(index)
        name = str(CONFIG_DIR / f"gemv_{kind}_{gpu}.{cap}.json")
        if not Path(name).exists():
            # Another GPU of the same architecture (an H200 reads an H100's table): the
            # same tiles keep the weight stream going; only the bandwidth differs.
            same = sorted(CONFIG_DIR.glob(f"gemv_{kind}_*.{cap}.json"))
            name = str(same[0]) if same else name
    try:
        return json.loads(Path(name).read_text())
    except (OSError, ValueError):
        return {}


def table_key(m: int, n: int, k: int) -> str:
    return f"{n}x{k}@{triton.next_power_of_2(max(m, 1))}"


def _table_choice(kind: str, m: int, n: int, k: int, device: torch.device | None) -> GemvConfig | str | None:
    """The `kind` table's entry for an [m, k] x [n, k] product: a GemvConfig, "torch", or None
    (no table, the shape not measured, or a config that cannot serve these rows or this K)."""
    entry = tuned_table(kind, device).get(table_key(m, n, k))
    if not isinstance(entry, dict):
        return entry
    if (not entry.get("dot", True) and m != 1) or k % entry["block_k"]:
        return None
    return GemvConfig(**entry)


def bf16_choice(m: int, n: int, k: int, device: torch.device | None = None) -> GemvConfig | str | None:
    """What the measured bf16 table says for an [m, k] x [n, k] product: a GemvConfig, "torch"
    (cuBLAS measured faster), or None (no table, or the shape was not measured)."""
    return _table_choice("bf16", m, n, k, device)


def fp8_max_rows(device: torch.device | None = None) -> int:
    """Rows up to which Fp8Linear serves through the gemv (the measured figure, else MAX_M)."""
    return min(int(fp8_tuned(device).get("max_rows", MAX_M)), MAX_M_FP8)


def default_config(m: int, n: int, k: int, fp8: bool = False, device: torch.device | None = None) -> GemvConfig:
    """The tile for an [m, k] x [n, k] product (for an FP8 weight, the measured one where
    fp8_tuned has it; else reasoned, not measured: see the module note).

    Narrow W (qkv 6144, o_proj and down_proj 4096 on Llama-3-8B): 16 rows per program and one
    warp, so every program is resident at once (qkv: 384 programs, about 3 per SM, each with
    three 8 KB weight tiles in flight); equal programs in one wave finish together, with no
    tail wave. One warp also avoids Triton replicating the 16-row MMA (and its shared-memory
    reads) across warps. Wide W (gate_up 28672, lm_head): 64 rows and 4 warps, fewer and
    larger programs. block_k divides K where it can, so the loop needs no K mask."""
    if fp8:
        tuned = _table_choice("fp8", m, n, k, device)
        if isinstance(tuned, GemvConfig):
            return tuned
    if n <= 16384:
        bn, bk, warps = 16, 256, 1
    else:
        bn, bk, warps = 64, 128, 4
    for cand in (bk, 128, 64, 32, 16):
        if k % cand == 0:
            bk = cand
            break
    return GemvConfig(bn, bk, warps, 4, True)


# What benchmarks/bench_gemv.py --sweep times (and tests/gpu checks): around the defaults,
# more rows or warps per program, deeper or shallower pipelines, and the elementwise loop.
CANDIDATES = (
    GemvConfig(8, 256, 1, 4),
    GemvConfig(16, 256, 1, 4),
    GemvConfig(16, 256, 1, 3),
    GemvConfig(16, 256, 2, 4),
    GemvConfig(16, 128, 1, 6),
    GemvConfig(16, 512, 1, 3),
    GemvConfig(32, 256, 1, 3),
    GemvConfig(32, 256, 2, 4),
    GemvConfig(64, 128, 4, 4),
    GemvConfig(64, 128, 4, 3),
    GemvConfig(4, 1024, 4, 1, dot=False),
    GemvConfig(8, 512, 4, 1, dot=False),
    GemvConfig(2, 1024, 4, 1, dot=False),
    # The FP8 sweep's one-row winners at the same bytes per tile (bf16 block_k = FP8's / 2).
    GemvConfig(8, 1024, 8, 1, dot=False),
    GemvConfig(4, 512, 2, 1, dot=False),
)
# ... and with FP8 weights (one byte each: longer K tiles carry the same bytes), M up to 64.
FP8_CANDIDATES = (
    GemvConfig(8, 512, 1, 4),
    GemvConfig(16, 512, 1, 3),
    GemvConfig(16, 512, 1, 4),
    GemvConfig(16, 1024, 1, 2),
    GemvConfig(32, 256, 1, 4),
    GemvConfig(32, 512, 1, 3),
    GemvConfig(64, 256, 4, 3),
    GemvConfig(64, 512, 4, 3),
    GemvConfig(16, 512, 2, 3),
    GemvConfig(16, 1024, 2, 2),
    GemvConfig(32, 512, 2, 3),
    GemvConfig(2, 2048, 4, 1, dot=False),
    GemvConfig(4, 1024, 4, 1, dot=False),
    GemvConfig(4, 2048, 8, 1, dot=False),
    GemvConfig(8, 512, 2, 1, dot=False),
    GemvConfig(8, 1024, 4, 1, dot=False),
    GemvConfig(8, 2048, 8, 1, dot=False),
    GemvConfig(16, 512, 4, 1, dot=False),
    # Split-K (16-64 rows on narrow W): a block_n that amortizes x's reads, K in 4-8 shares.
    GemvConfig(32, 256, 2, 3, split_k=4),
    GemvConfig(64, 128, 4, 4, split_k=4),
    GemvConfig(64, 128, 4, 4, split_k=8),
    GemvConfig(64, 256, 4, 3, split_k=4),
    GemvConfig(128, 128, 4, 3, split_k=4),
    GemvConfig(128, 128, 8, 3, split_k=8),
)


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
            if PRO != 0:
                kin = (k0 + rk) < k_hi
                if EVEN_K:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=kin[None, :], other=0.0)
                xt = _prologue(X, R, NW, RO, rm[None, :] * stride_xm + (k0 + rk)[:, None], (k0 + rk)[:, None],
                               x_rows & kin[:, None], rstd[None, :], K, write,
                               PRO, HAS_RES, LIBDEVICE_EXP, MANUAL_BF16_X)
            elif EVEN_K:
                w = tl.load(w_ptrs)
                xt = tl.load(x_ptrs, mask=x_rows, other=0.0)
            else:
                kin = (k0 + rk) < k_hi
                w = tl.load(w_ptrs, mask=kin[None, :], other=0.0)
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
            if PRO != 0:
                kin = (k0 + rk) < K
                if EVEN_K:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=kin[None, :], other=0.0)
                x = _prologue(X, R, NW, RO, k0 + rk, k0 + rk, kin, rstd1, K, write,
                              PRO, HAS_RES, LIBDEVICE_EXP, MANUAL_BF16_X)
            elif EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                kin = (k0 + rk) < K
                w = tl.load(w_ptrs, mask=kin[None, :], other=0.0)
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
