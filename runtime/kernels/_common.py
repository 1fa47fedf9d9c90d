"""What the fused elementwise kernels (rmsnorm, rope_kv, silu_mul) share: input checks and
rounding to the output dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# An FP8 KV cache (--kv-cache-dtype fp8_e4m3): K and V stored as e4m3 with scale 1 (no
# calibrated scales), widened to the queries' dtype as the attention kernels load them.
KV_FP8 = torch.float8_e4m3fn


def check_kv_dtype(op: str, q_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The KV cache holds q's dtype, or FP8 beside bf16/fp16 queries."""
    ok = (q_dtype,) + ((KV_FP8,) if q_dtype in (torch.float16, torch.bfloat16) else ())
    if k_cache.dtype not in ok or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: k_cache and v_cache must both be one of {ok} beside {q_dtype} queries, got "
                        f"{k_cache.dtype} and {v_cache.dtype}")


@triton.jit
def round_to(x, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 x rounded to nearest-even in `dtype`. Triton's interpreter truncates fp32 -> bf16
    casts, so under it (MANUAL_BF16) bf16 is rounded with integer ops; NaN payloads with
    only low mantissa bits set are not preserved there."""
    if MANUAL_BF16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        out = r.to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


INTERPRETED = not isinstance(round_to, triton.runtime.JITFunction)


def manual_bf16(dtype: torch.dtype) -> bool:
    """The MANUAL_BF16 argument of `round_to` for outputs of `dtype`."""
    return INTERPRETED and dtype == torch.bfloat16


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """t's dtype is `dtype`, or with None one of DTYPES."""
    if dtype is None and t.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not supported; use one of {DTYPES}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def check_placement(op: str, tensors: dict[str, torch.Tensor], any_stride: tuple[str, ...] = ()) -> None:
    """All tensors on one device, CUDA unless Triton's interpreter runs; last dims contiguous
    (but for those named in any_stride)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got "
                         f"{({n: str(t.device) for n, t in tensors.items()})}")
    for name, t in tensors.items():
        if t.numel() and t.stride(-1) != 1 and name not in any_stride:
            raise ValueError(f"{op}: {name} must be contiguous in its last dim (stride {t.stride(-1)})")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op} needs CUDA tensors (got {device}); on CPU it runs only under "
                         "TRITON_INTERPRET=1, set before triton is imported")
