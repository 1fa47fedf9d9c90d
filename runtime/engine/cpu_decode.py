"""Decode-sized forwards of the decoder layers on CPU without nn.Module dispatch.

A decode step of SmolLM2-135M (30 layers) on the 2-core development machine spent ~2 ms of
~16 in Python around its torch ops: module calls, parameter and buffer lookups through
nn.Module.__getattr__, and three wrappers around each projection (linear, QuantLinear.forward,
matmul), some 90 Python frames per layer, each slow when the weights just streamed through
the caches. `FlatLayers` reads every layer's tensors once, when the projections are fused,
and runs the same functions and ops in the same order as the modules (the same bits;
tests/unit/test_cpu_decode.py). Inputs of more than DENSE_ABOVE rows (prefill) keep the
modules: their projections may run a dense copy, and Python is noise at that size.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.model import ForwardContext, apply_rms_norm, attend, silu_mul
from runtime.engine.model_config import ModelConfig
from runtime.engine.quant.base import QuantLinear

Op = tuple[Callable[..., torch.Tensor], tuple]  # y = op(x, *args)


class _Layer(NamedTuple):
    layer_id: int
    norm1: tuple[torch.Tensor, float]  # weight, eps
    qkv: Op
    o: Op
    norm2: tuple[torch.Tensor, float]
    gate_up: Op
    down: Op
    scale: float


def _op(mod: nn.Module, dtype: torch.dtype) -> Op | None:
    """What the module computes for decode-sized inputs as one op, or None."""
    if type(mod) is nn.Linear:
        return F.linear, (mod.weight, mod.bias)
    if isinstance(mod, QuantLinear):
        return mod.decode_op(dtype)
    return None


class FlatLayers:
    def __init__(self, layers: list[_Layer], cfg: ModelConfig) -> None:
        self.layers, self.cfg = layers, cfg

    @classmethod
    def build(cls, layers: nn.ModuleList) -> FlatLayers | None:
        """From fused layers on CPU; None where a layer needs its modules (unfused, or a
        projection with no single decode op)."""
        flat = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if "qkv_proj" not in attn._modules or "gate_up_proj" not in mlp._modules:
                return None
            dtype = layer.input_layernorm.weight.dtype
            ops = [_op(m, dtype) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(op is None for op in ops):
                return None
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            flat.append(_Layer(attn.layer_id, (n1.weight, n1.eps), ops[0], ops[1], (n2.weight, n2.eps), ops[2], ops[3],
                               attn.scale))
        return cls(flat, layers[0].self_attn.cfg) if flat else None

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """DecoderLayer by DecoderLayer over x [T, hidden]: (the last layer's output, the
        residual stream before it is added), as LlamaModel's loop returns them."""
        cfg, residual = self.cfg, None
        for lid, norm1, (qkv, qkv_args), (o, o_args), norm2, (gate_up, gu_args), (down, down_args), scale \
                in self.layers:
            residual = x if residual is None else x + residual
            h = apply_rms_norm(residual, *norm1)
            out = attend(qkv(h, *qkv_args), rope, ctx, lid, cfg, scale)
            residual = o(out.contiguous(), *o_args) + residual  # packed ops want it, as QuantLinear.forward
            h = apply_rms_norm(residual, *norm2)
            x = down(silu_mul(gate_up(h, *gu_args)), *down_args)
        return x, residual
