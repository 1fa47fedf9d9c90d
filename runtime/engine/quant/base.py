"""The linear-layer interface the model's projections run through.

A projection is either a plain `nn.Linear` (the dense implementation: fp32 / bf16 / fp16
weights, what the model is built with) or a `QuantLinear`: the same `forward(x)` for
x [..., K] -> [..., N] in x's dtype, plus `dequantize()`, the weight it stands for as a
dense [N, K] tensor (the reference its tests compare against, and what code that needs a
plain weight reads). Only the decoder layers' projections are quantized (the fused
q|k|v and gate|up, o_proj, down_proj); embeddings, norms and lm_head stay dense.
"""
from __future__ import annotations

import torch
from torch import nn

# What `--quantization` accepts. "auto": what the checkpoint declares (an FP8 config.json,
# a GGUF's Q4_0/Q4_1/Q8_0 blocks on CPU), else none.
QUANTIZATIONS = ("auto", "none", "fp8", "int8", "int4")
CPU_ONLY = ("int8", "int4")  # torch's weight-only packed ops exist for CPU only


class QuantLinear(nn.Module):
    """A quantized projection; weights are buffers (nothing here trains)."""

    scheme: str = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, dense [N, K] in `dtype`."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous -> [M, N] in x's dtype, without the bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [N, K] weight of a projection, dense or quantized (dequantized)."""
    if isinstance(module, QuantLinear):
        return module.dequantize(dtype or torch.float32)
    w = module.weight
    return w if dtype is None else w.to(dtype)
