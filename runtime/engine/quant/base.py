"""The linear-layer interface the model's projections run through.

A projection is either a plain `nn.Linear` (the dense implementation: fp32 / bf16 / fp16
weights, what the model is built with) or a `QuantLinear`: the same `forward(x)` for
x [..., K] -> [..., N] in x's dtype, plus `dequantize()`, the weight it stands for as a
dense [N, K] tensor (the reference its tests compare against, and what code that needs a
plain weight reads). Only the decoder layers' projections are quantized (the fused
q|k|v and gate|up, o_proj, down_proj); embeddings, norms and lm_head stay dense.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from runtime.common.hardware import cpu_flags

# QUANTIZATIONS (what `--quantization` accepts) and CPU_ONLY are defined in runtime/config.py.
# torch's packed int8/int4 CPU ops read 2-4x fewer bytes than a bf16 GEMM and win for a few
# rows (decode), but lose 4-10x to the oneDNN bf16 GEMM on prefill-sized inputs (2-core Xeon
# with AMX, K 576 N 3072: 1 row int4 147 us vs bf16 356 us; 512 rows 23.8 ms vs 5.5 ms). A
# layer with a dense copy (keep_dense) runs inputs of more than PACKED_MAX_ROWS rows through it.
# DENSE_ABOVE: the rows up to which the model's per-layer decode path and int8 lm_head serve.
DENSE_ABOVE = 8


def _packed_max_rows() -> int:
    """Where the packed ops stop winning depends on the bf16 GEMM they race. With AMX it is
    fast and 8 stays (the Xeon above; rows between 1 and 512 were not measured there).
    Without it (AVX-512 BF16 only: 2-core AMD EPYC, the default model's 120 projections with
    cold weights) int4 still won at 12 rows (9.6 vs 11.5 ms) and 16 (11.0 vs 11.8) and lost
    at 24 (15.8 vs 13.4); decode steps of batch 12 went from 27.7 to 24.3 ms with 16."""
    return DENSE_ABOVE if "amx_bf16" in cpu_flags() else 16


PACKED_MAX_ROWS = _packed_max_rows()


class QuantLinear(nn.Module):
    """A quantized projection; weights are buffers (nothing here trains)."""

    scheme: str = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias)
        self.dense: torch.Tensor | None = None  # [N, K] for inputs of more than PACKED_MAX_ROWS rows

    def keep_dense(self, dtype: torch.dtype, weight: torch.Tensor | None = None) -> None:
        """Also keep the dense [N, K] weight (`weight`, shared, or this layer's dequantized)
        in `dtype` for prefill-sized inputs: the weights' memory grows by the dense copy."""
        self.dense = (weight if weight is not None else self.dequantize(dtype)).to(dtype).contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, dense [N, K] in `dtype`."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous -> [M, N] in x's dtype, without the bias."""
        raise NotImplementedError

    def decode_op(self, dtype: torch.dtype) -> tuple[Callable[..., torch.Tensor], tuple] | None:
        """(op, args) with op(x, *args) == self(x) for x [M, K] contiguous in `dtype`, M at most
        DENSE_ABOVE: the packed op itself, for callers that skip the module (cpu_decode.py);
        None where there is no such single op (a bias, another dtype's scales)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # [..., K]: as rows (the packed serving rows are 2-D already)
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.dense is not None and x.shape[0] > PACKED_MAX_ROWS:
            y = torch.nn.functional.linear(x, self.dense.to(x.dtype))
        else:
            y = self.matmul(x.contiguous())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [N, K] weight of a projection, dense or quantized (dequantized)."""
    if isinstance(module, QuantLinear):
        return module.dequantize(dtype or torch.float32)
    w = module.weight
    return w if dtype is None else w.to(dtype)
