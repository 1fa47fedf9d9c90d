"""What a checkpoint declares about quantization, and reading a projection's weight with
its scales: config.json's `quantization_config` (FP8, as llm-compressor / neuralmagic /
RedHat publish it: `quant_method` "fp8", or "compressed-tensors" with 8-bit float weights),
or a GGUF's block types."""
from __future__ import annotations

from typing import Callable

import torch

from runtime.config import CPU_ONLY, QUANTIZATIONS
from runtime.engine.quant.fp8 import FP8, checkpoint_fp8_weight
from runtime.engine.quant.payload import Payload, QWeight

# Checkpoint entries that belong to a weight rather than being parameters. `input_scale`
# (a static activation scale) is not used: activations get dynamic per-token scales.
# `k_scale` / `v_scale` (an FP8 KV cache) are not used: the KV cache stays in the model dtype.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".k_scale", ".v_scale")


def _get(obj: object, key: str, default: object = None) -> object:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _compressed_tensors_fp8(qc: object) -> bool:
    """Whether a compressed-tensors config quantizes weights to 8-bit floats."""
    groups = _get(qc, "config_groups") or {}
    weights = [_get(g, "weights") for g in (groups.values() if isinstance(groups, dict) else [])]
    return bool(weights) and all(w is not None and _get(w, "type") == "float" and _get(w, "num_bits") == 8
                                 for w in weights)


def declared_quantization(hf_config: object = None, gguf_file: str | None = None) -> str:
    """"fp8", "int4", "int8" or "none": what the checkpoint's own format is."""
    if gguf_file is not None:
        from gguf import GGUFReader

        from runtime.engine.quant.gguf import declared_scheme

        return declared_scheme(GGUFReader(gguf_file))
    qc = _get(hf_config, "quantization_config")
    if qc is None:
        return "none"
    method = _get(qc, "quant_method")
    if method == "fp8" or (method == "compressed-tensors" and _compressed_tensors_fp8(qc)):
        return "fp8"
    raise ValueError(f"the checkpoint's quantization_config (quant_method {method!r}) is not supported: "
                     f"this runtime loads FP8 checkpoints, GGUF Q4_0/Q4_1/Q8_0, and quantizes dense ones "
                     f"itself (--quantization fp8|int8|int4)")


def resolve_quantization(requested: str, declared: str, device: torch.device) -> str:
    """The scheme to serve with. "auto" follows the checkpoint where the device runs it:
    GGUF int4/int8 on CPU (on CUDA the blocks are dequantized), FP8 on CUDA (on CPU an FP8
    checkpoint is dequantized into the model dtype; --quantization fp8 runs the slow
    reference path instead)."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {requested!r})")
    if requested == "auto":
        if declared in CPU_ONLY and device.type != "cpu":
            return "none"
        if declared == "fp8" and device.type != "cuda":
            return "none"
        return declared
    if requested in CPU_ONLY and device.type != "cpu":
        raise ValueError(f"quantization {requested!r} runs on CPU only (torch's weight-only packed ops); "
                         f"on {device.type} use fp8 or none")
    return requested


def read_projection(read: Callable[[], Payload], scales: dict[str, Callable[[], torch.Tensor]], name: str,
                    dev: torch.device) -> Payload:
    """The payload of weight `name` on `dev`: an FP8 weight with its scale as QWeight
    "fp8" (per-channel scales), GGUF blocks as they are, any other tensor uncast."""
    t = read()
    if isinstance(t, QWeight):
        return QWeight(t.kind, tuple(x.to(dev) for x in t.tensors))
    t = t.to(dev)
    if t.dtype != FP8:
        return t
    base = name.removesuffix(".weight")
    scale = scales.get(base + ".weight_scale") or scales.get(base + ".weight_scale_inv")
    if scale is None:
        raise ValueError(f"{name} is float8_e4m3fn but the checkpoint has no {base}.weight_scale")
    return QWeight("fp8", checkpoint_fp8_weight(t, scale().to(dev)))
