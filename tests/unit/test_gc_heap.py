"""runtime/common/gc_heap.py: server processes freeze their start-up heap out of GC scans."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_freezing_the_start_up_heap_keeps_later_garbage_collectable() -> None:
    """In a child process (freezing the test process's heap would keep its later garbage):
    start-up garbage is collected first, every live object is frozen, and cycles made
    afterwards are still found by the collector."""
    code = """
import gc, logging
logging.basicConfig(level=logging.INFO)
from runtime.common.gc_heap import freeze_startup_heap
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
gc.disable()  # no automatic collection: only freeze_startup_heap's own may free the first cycle
cycle()  # start-up garbage: must be collected, not frozen
keep = [Node() for _ in range(1000)]
freeze_startup_heap("test")
frozen = gc.get_freeze_count()
assert frozen >= 1000, frozen
cycle()
assert gc.collect() >= 2, "a cycle made after the freeze was not collected"
gc.unfreeze()  # frozen objects are invisible to gc.get_objects(); the first cycle must be gone
assert not [o for o in gc.get_objects() if isinstance(o, Node) and hasattr(o, "other")], "start-up garbage was frozen"
print("ok", frozen)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    assert "start-up objects frozen out of GC scans" in proc.stderr
