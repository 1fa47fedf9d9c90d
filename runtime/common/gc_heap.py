"""Keeping Python's cyclic garbage collector out of the serving loops.

A serving process holds a few hundred thousand GC-tracked objects from its start (torch,
transformers, Triton, FastAPI, the model's modules): a full collection of an engine
process scanned ~374k objects in ~235 ms on the development CPU, and one comes whenever
enough new objects have survived, stalling whichever decode step or event-loop turn it
lands in (an ITL spike). Those start-up objects live as long as the process, so after
start each server process moves them out of the collector's scans (`gc.freeze`); later
collections see only what serving creates (requests, cache nodes), and new garbage is
collected as before.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap(who: str) -> None:
    """Collect what start-up left as garbage, then exempt every live object from later scans."""
    started = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - started
    gc.freeze()
    log.info("%s: %d start-up objects frozen out of GC scans (a full collection took %.0f ms before)",
             who, gc.get_freeze_count(), took * 1e3)
