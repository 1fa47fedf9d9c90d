"""Quantized linear layers (FP8 on CUDA, int8 / int4 weight-only on CPU) and the payloads
checkpoints hand them. See base.py for the interface and README.md, Quantization."""
from __future__ import annotations

from runtime.config import CPU_ONLY, QUANTIZATIONS
from runtime.engine.quant.base import QuantLinear, dense_weight
from runtime.engine.quant.fp8 import Fp8Linear
from runtime.engine.quant.int4 import Int4Linear
from runtime.engine.quant.int8 import Int8Linear
from runtime.engine.quant.payload import Payload, QWeight, build_linear, fuse_payloads

__all__ = [
    "CPU_ONLY", "QUANTIZATIONS", "QuantLinear", "dense_weight", "Fp8Linear", "Int4Linear", "Int8Linear",
    "Payload", "QWeight", "build_linear", "fuse_payloads",
]
