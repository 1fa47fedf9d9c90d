"""The fused Triton kernels (RMSNorm, rotary + KV store, SiLU-mul, the draft step's lm_head
top-k and tree kernels) compiled for the GPU,
against the model's torch ops on the same device: the interpreter cases of
tests/unit/test_fused_kernels_interp.py, run natively; then inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_fused_kernels_interp import CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


_FLAT = [(fn, case) for fn, cases in CASES.values() for case in cases]


@pytest.mark.parametrize("fn,case", _FLAT, ids=[case[0] for _, case in _FLAT])
def test_fused_kernel_matches_torch_on_cuda(fn, case: tuple) -> None:
    pytest.importorskip("triton")
    assert fn(*case, device="cuda") is None


def test_fused_kernels_capture_in_a_cuda_graph() -> None:
    pytest.importorskip("triton")
    from runtime.kernels.rmsnorm import rmsnorm
    from runtime.kernels.silu_mul import silu_and_mul

    x = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(576, device="cuda", dtype=torch.bfloat16) + 0.5
    gate_up = torch.randn(4, 3072, device="cuda", dtype=torch.bfloat16)
    want_norm, want_act = rmsnorm(x, w, 1e-5), silu_and_mul(gate_up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_norm, got_act = rmsnorm(x, w, 1e-5), silu_and_mul(gate_up)
    x.add_(1.0)  # new inputs, replayed (not a scaling: RMSNorm is scale-invariant)
    gate_up.mul_(-1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got_norm, rmsnorm(x, w, 1e-5)) and not torch.equal(got_norm, want_norm)
    assert torch.equal(got_act, silu_and_mul(gate_up)) and not torch.equal(got_act, want_act)
