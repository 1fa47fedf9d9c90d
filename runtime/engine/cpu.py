"""What this CPU does well, read once at start: whether it multiplies bf16 natively
(AVX-512 BF16 or AMX, /proc/cpuinfo flags) and how many physical cores it has (torch's
intra-op threads; hyper-threads share a core's vector units, so they add little to GEMMs)."""
from __future__ import annotations

import functools
import logging
import os

import torch

from runtime.env import ENV

log = logging.getLogger("runtime.engine")

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux: assume nothing
        return ""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16() -> bool:
    """Whether bf16 GEMMs run natively here (oneDNN uses these instructions)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs this process may run on; os.cpu_count() if unknown."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, proc, phys = set(), None, "0"
    for line in _cpuinfo().splitlines():
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "processor":
            proc = int(val)
        elif key == "physical id":
            phys = val
        elif key == "core id" and (allowed is None or proc in allowed):
            cores.add((phys, val))
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1


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
