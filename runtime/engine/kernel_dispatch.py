"""Which kernels run the model's pieces on CUDA: our fused Triton kernels (RMSNorm, rotary
+ KV store, SiLU-mul) where they apply, runtime/kernels/gemv.py for decode-shaped
projections where it is measured (or RUNTIME_GEMV says) faster than cuBLAS, and with
RUNTIME_GEMV_FUSE the norms and SiLU-mul folded into those gemvs. CPU and autograd always
take the torch path (model.py), which is the reference."""
from __future__ import annotations

import logging

import torch
from torch import nn

from runtime.engine.quant import QuantLinear
from runtime.env import ENV

log = logging.getLogger(__name__)

_KERNELS: bool | None = None  # whether runtime/kernels/ (Triton) imports on this machine


def fused_kernels(x: torch.Tensor) -> bool:
    """Whether to run this tensor's RMSNorm, rotary + KV store and SiLU-mul as our fused
    Triton kernels (one launch each instead of five to fourteen torch ops: a small model's
    decode step is bound by kernel launches). CUDA half precision only, and never under
    autograd (train-draft stays on torch ops); the torch path is the reference."""
    global _KERNELS
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.requires_grad:
        return False
    if _KERNELS is None:
        try:
            import runtime.kernels.rmsnorm  # noqa: F401
            import runtime.kernels.rope_kv  # noqa: F401
            import runtime.kernels.silu_mul  # noqa: F401

            _KERNELS = True
        except Exception:  # no Triton: stay on torch
            _KERNELS = False
    return _KERNELS


_GEMV: str | None = None  # RUNTIME_GEMV ("off" without runtime/kernels/gemv.py); read on first CUDA use
_FUSE: bool | None = None  # RUNTIME_GEMV_FUSE; False after a fused launch failed once


def _gemv_mode() -> str:
    global _GEMV
    if _GEMV is None:
        mode = ENV.gemv
        if mode not in ("auto", "attn", "off"):
            raise ValueError(f"RUNTIME_GEMV must be 'auto', 'attn' or 'off', got {mode!r}")
        try:
            import runtime.kernels.gemv  # noqa: F401

            _GEMV = mode
        except Exception:  # no Triton: stay on torch
            _GEMV = "off"
    return _GEMV


def gemv_args(module: nn.Linear | QuantLinear, x: torch.Tensor, attn_block: bool = False) -> dict | None:
    """How `linear(module, x)` runs through runtime/kernels/gemv.py (its weight, bias, scale and
    config, as keyword arguments), or None where it does not: for a decode-shaped x (at most
    16 rows, CUDA half precision, no autograd: gemv_serves) on a dense weight, where the GPU's
    measured table (kernels/configs/gemv_bf16_*.json) names a config, or for shapes it has not
    measured, as RUNTIME_GEMV says (auto: every projection, attn: the attention block's
    alone); an FP8 layer's weight-only gemv where Fp8Linear serves through it."""
    if not x.is_cuda or _gemv_mode() == "off":
        return None
    if isinstance(module, QuantLinear):
        serve = getattr(module, "gemv_args", None)
        return serve(x) if serve is not None else None
    from runtime.kernels.gemv import gemv_serves
    from runtime.kernels.gemv_configs import bf16_choice

    w = module.weight
    if not gemv_serves(x, w):
        return None
    choice = bf16_choice(x.shape[0], w.shape[0], w.shape[1], x.device)
    if choice is None and (_GEMV == "auto" or attn_block):  # not measured: the mode's rule
        return dict(weight=w, bias=module.bias, config=None, scale=None)
    if choice is not None and choice != "torch":
        return dict(weight=w, bias=module.bias, config=choice, scale=None)
    return None


def linear(module: nn.Linear | QuantLinear, x: torch.Tensor, attn_block: bool = False) -> torch.Tensor:
    """module(x), or for a decode-shaped x on a dense weight runtime/kernels/gemv.py's
    single-pass kernel, which reads the weight once with no split-K reduce launch (issue 14;
    where: gemv_args). RUNTIME_GEMV=off: cuBLAS throughout. CPU never gets there; quantized
    layers dispatch on their own."""
    if x.is_cuda and not isinstance(module, QuantLinear):
        args = gemv_args(module, x, attn_block)
        if args is not None:
            from runtime.kernels.gemv import gemv

            return gemv(x, **args)
    return module(x)


def fuse_on(x: torch.Tensor) -> bool:
    """Whether decode rows fold RMSNorm and SiLU-mul into the gemv after them
    (RUNTIME_GEMV_FUSE); the torch path and CPU never do."""
    global _FUSE
    if _FUSE is None:
        mode = ENV.gemv_fuse
        if mode not in ("on", "off"):
            raise ValueError(f"RUNTIME_GEMV_FUSE must be 'on' or 'off', got {mode!r}")
        _FUSE = mode == "on"
    return _FUSE and x.is_cuda and x.dim() == 2 and fused_kernels(x)


def fused_gemv(op: str, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """kernels/gemv.py's fused `op`, or None (and fusion off from then on) if it failed: a
    compile error comes at the first, eager call, before any CUDA graph captures it."""
    global _FUSE
    from runtime.kernels import gemv as kernels

    try:
        return getattr(kernels, op)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        _FUSE = False
        log.warning("fused %s failed on %s (%s: %s); RMSNorm and SiLU-mul run as launches of their own",
                    op, args[0].device, type(e).__name__, e)
        return None
