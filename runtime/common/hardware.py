"""The host's CPU as /proc/cpuinfo describes it: its flags and how many physical cores this
process may run on (the engine sizes torch's threads by them, the controller splits them
between the workers it starts)."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux: assume nothing
        return ""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    for line in cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs this process may run on; os.cpu_count() if unknown."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, proc, phys = set(), None, "0"
    for line in cpuinfo().splitlines():
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "processor":
            proc = int(val)
        elif key == "physical id":
            phys = val
        elif key == "core id" and (allowed is None or proc in allowed):
            cores.add((phys, val))
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1
