"""The one registry of environment variables the runtime reads.

Every variable is declared here with its default and meaning; code reads them through
`ENV.<name>` and nowhere else, so `runtime --help-env` (and this file) list them all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Var:
    name: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)


_VARS = {
    "cache_dir": _Var(
        "RUNTIME_CACHE_DIR",
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "runtime"),
        "where the default model is downloaded and converted",
    ),
    "attention_backend": _Var(
        "RUNTIME_ATTENTION_BACKEND", "auto", "auto | torch | triton | flashinfer"
    ),
    "gemv": _Var(
        "RUNTIME_GEMV", "attn",
        "auto | attn | off: auto runs the model's projections for at most 16 rows (decode; CUDA, bf16/fp16) "
        "with runtime/kernels/gemv.py instead of cuBLAS, attn only the attention block's (qkv_proj, o_proj) (issue 14); "
        "a shape in the GPU's measured table (runtime/kernels/configs/gemv_bf16_*.json) goes as measured, unless off",
    ),
    "gemv_fuse": _Var(
        "RUNTIME_GEMV_FUSE", "off",
        "on | off: on folds each decoder layer's RMSNorms (with the residual add) and SiLU-mul into the "
        "runtime/kernels/gemv.py launch of the projection after them, where that projection runs the gemv "
        "(decode rows: 96 fewer launches per step on a 32-layer model)",
    ),
    "decode_merge": _Var(
        "RUNTIME_DECODE_MERGE", "launch",
        "launch | fused: how the paged-decode kernel's splits are merged: a second launch, or by the last split "
        "of each sequence and KV head to finish (one launch fewer per layer; off until measured on a GPU)",
    ),
    "cpu_threads": _Var(
        "RUNTIME_CPU_THREADS", "", "torch intra-op threads on CPU; empty: the physical cores this process may use",
    ),
    "log_level": _Var("RUNTIME_LOG_LEVEL", "info", "default log level"),
    "cuda_visible_devices": _Var(
        "CUDA_VISIBLE_DEVICES", "", "CUDA's own; `runtime up` sets it per worker from --prefill-gpus/--decode-gpus"
    ),
    "test_fail_alloc": _Var(
        "RUNTIME_TEST_FAIL_ALLOC", "",
        "TEST ONLY: make engine steps fail as if out of memory (torch.cuda.OutOfMemoryError after the forward): "
        "'steps:3,5' (an engine's 3rd and 5th forwards, counted from 1) or 'tokens:N' (every forward of more than "
        "N new tokens); empty: off",
    ),
    "test_step_delay": _Var(
        "RUNTIME_TEST_STEP_DELAY", "",
        "TEST ONLY: seconds a worker sleeps after each engine step (keeps a tiny model's request running long "
        "enough for tests of draining and failover to see it); empty: off",
    ),
}


class _Env:
    def __getattr__(self, key: str) -> str:
        try:
            return _VARS[key].get()
        except KeyError:
            raise AttributeError(f"unknown runtime environment variable {key!r}") from None

    @staticmethod
    def describe() -> str:
        return "\n".join(f"{v.name} (default {v.default!r}): {v.help}" for v in _VARS.values())


ENV = _Env()
