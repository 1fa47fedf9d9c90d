"""kernels/gemv.py's launch configurations: the GemvConfig tile, the reasoned defaults, the
candidates the benchmarks sweep, and the measured per-GPU tables (configs/*.json) that
choose among them. No kernel here: what the gemv runs, not how."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

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
# where cuBLAS beat every config (kernel_dispatch.linear then keeps F.linear). An FP8 file also holds
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
    """Rows up to which Fp8Linear serves through the gemv where fp8_uses_gemv has no
    per-shape answer (the measured figure, else MAX_M)."""
    return min(int(fp8_tuned(device).get("max_rows", MAX_M)), MAX_M_FP8)


def fp8_uses_gemv(m: int, n: int, k: int, device: torch.device | None = None) -> bool | None:
    """Whether the measured FP8 table says the weight-only gemv beat `_scaled_mm` for this
    shape at this many rows (True: a config was measured best; False: "torch"); None when
    the table does not say (no table, an older table whose configs are the best gemv's
    whether or not it won, the shape not measured, or a config that cannot serve the rows)."""
    if m > MAX_M_FP8:
        return False
    table = fp8_tuned(device)
    if not table.get("per_shape"):
        return None
    entry = table.get(table_key(m, n, k))
    if entry == "torch":
        return False
    return True if isinstance(entry, dict) and _table_choice("fp8", m, n, k, device) is not None else None


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
