"""Attention backends and the one place that picks among them.

Backends that need optional packages (triton, flashinfer) are imported only when chosen.
"""
from __future__ import annotations

import importlib

import torch

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention
from runtime.env import ENV

BACKENDS = ("auto", "torch", "triton", "flashinfer")

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttention", "BACKENDS", "make_attention_backend"]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # not installed, or installed but broken (missing CUDA libs, ...)
        return False
    return True


def make_attention_backend(
    name: str | None,
    device: torch.device | str,
    *,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    kv_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """name: auto | torch | triton | flashinfer (None: RUNTIME_ATTENTION_BACKEND).

    auto picks flashinfer on CUDA when it imports (and dtype is not fp32), else triton on CUDA when it imports,
    else torch. An explicit choice that cannot run here raises a clear error. The head
    shape and dtype are optional; flashinfer uses them to plan in prepare(). kv_dtype: the KV
    pool's element type when it differs from dtype (FP8), which flashinfer is not given here."""
    name = (name if name is not None else ENV.attention_backend).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    # flashinfer has no fp32 kernels.
    fi_dtype_ok = dtype in (None, torch.float16, torch.bfloat16)
    # auto only: flashinfer's prebuilt/JIT head sizes; other sizes (the tests' tiny models,
    # head dim 16) failed on the H200, so auto leaves them to Triton.
    fi_dtype_ok = fi_dtype_ok and head_dim in (None, 64, 128, 256) and kv_dtype in (None, dtype)
    if name == "auto":
        if cuda and fi_dtype_ok and _importable("flashinfer"):
            name = "flashinfer"
        elif cuda and _importable("triton"):
            name = "triton"
        else:
            name = "torch"

    if name == "torch":
        return TorchAttention()
    if not cuda:
        raise ValueError(f"{name} attention needs a CUDA device (got {device}); set RUNTIME_ATTENTION_BACKEND=torch or auto")
    if name == "triton":
        if not _importable("triton"):
            raise ImportError("triton attention needs the triton package: pip install triton")
        from runtime.engine.attention.triton_backend import TritonAttention

        return TritonAttention()
    if not _importable("flashinfer"):
        raise ImportError(
            "flashinfer attention needs the flashinfer-python package (pip install flashinfer-python), "
            "or choose triton or torch"
        )
    if kv_dtype not in (None, dtype):
        raise ValueError(f"flashinfer attention here reads a KV cache of the model's dtype, not {kv_dtype}: "
                         "use --attention-backend triton with --kv-cache-dtype fp8_e4m3")
    from runtime.engine.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention(
        device, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
    )
