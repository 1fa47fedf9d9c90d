"""What this CPU does well, read once at start: whether it multiplies bf16 natively
(AVX-512 BF16 or AMX, /proc/cpuinfo flags) and how many physical cores it has (torch's
intra-op threads; hyper-threads share a core's vector units, so they add little to GEMMs).
Reading /proc/cpuinfo is runtime/common/hardware.py's (the controller counts cores too)."""
from __future__ import annotations

import logging

import torch

from runtime.common.hardware import cpu_flags, physical_cores
from runtime.env import ENV

log = logging.getLogger("runtime.engine")

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """Whether bf16 GEMMs run natively here (oneDNN uses these instructions)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


_CONFIGURED = False


def configure_cpu() -> None:
    """Set torch's intra-op threads (RUNTIME_CPU_THREADS, else the physical cores) and log
    what the CPU offers, once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    want = ENV.cpu_threads
    try:
        threads = int(want) if want else physical_cores()
    except ValueError:
        raise ValueError(f"RUNTIME_CPU_THREADS must be a number of threads, got {want!r}") from None
    if threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    found = [f for f in BF16_FLAGS if f in cpu_flags()]
    log.info("cpu: %d torch threads (%s), native bf16: %s -> dtype auto is %s", torch.get_num_threads(),
             "RUNTIME_CPU_THREADS" if want else "physical cores", ", ".join(found) or "no",
             "bfloat16" if found else "float32")
