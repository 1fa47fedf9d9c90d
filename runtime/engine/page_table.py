"""The decode graphs' host page table, written incrementally from step to step.

A decode step at batch 256 hands the CUDA graphs 256 page lists of ~70 pages each (1,150
tokens in pages of 16); writing them into the pinned host table row by row took ~0.35 ms of
host time per step on the development CPU, while the GPU waited (issue 14: the step's host
part at batch 256 was ~1.9 ms on the H200's host). From one step to the next almost every
row holds the same sequence with at most one page more, so a row is rewritten only where
its sequence changed; otherwise only the pages appended since are written.

That is safe only if a list's earlier entries cannot change unseen. `PageList` (what a
request's `pages` is) counts every mutation other than appending (`version`); a row is
kept only for the very same list object (held here, so its id is never reused), at the
same version, no shorter than what was written. Plain lists (a drafter's own pages) are
written whole every time, as before.
"""
from __future__ import annotations

import numpy as np


def _counted(name: str):
    """list's method `name`, counting the call in the PageList's version first."""
    base = getattr(list, name)

    def method(self, *args, **kwargs):
        self.version += 1
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


class PageList(list):
    """A list of KV page ids that counts in `version` every change other than appending
    (append, extend and += keep list's C speed and leave it)."""

    __slots__ = ("version",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.version = 0

    __setitem__ = _counted("__setitem__")
    __delitem__ = _counted("__delitem__")
    __imul__ = _counted("__imul__")
    clear = _counted("clear")
    insert = _counted("insert")
    pop = _counted("pop")
    remove = _counted("remove")
    reverse = _counted("reverse")
    sort = _counted("sort")


class PageTableRows:
    """Rows of a host page table [rows, max_pages] (int32, numpy) filled per step from page
    lists, remembering what each row holds."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        # Per row: (the list written there, its version then, how many of its pages were written).
        self._held: list[tuple[PageList, int, int] | None] = [None] * table.shape[0]
        self.pages_written = 0  # page ids written by fill() in all (tests and benchmarks read it)

    def fill(self, page_lists: list[list[int]]) -> None:
        """Row i of the table holds page_lists[i] in its first len(page_lists[i]) columns
        (later columns are left as they were: the attention reads only a row's kv_len keys).
        Consecutive rows may share one list object (a sequence's verify rows)."""
        table, held = self.table, self._held
        written = 0
        prev = None
        for i, pages in enumerate(page_lists):
            n = len(pages)
            if pages is prev:  # the row above holds this very list
                table[i, :n] = table[i - 1, :n]
                held[i] = held[i - 1]
                written += n
                continue
            prev = pages
            h = held[i]
            if type(pages) is PageList:
                if h is not None and h[0] is pages and h[1] == pages.version and h[2] <= n:
                    if h[2] < n:
                        table[i, h[2] : n] = pages[h[2] :]
                        written += n - h[2]
                else:
                    table[i, :n] = pages
                    written += n
                held[i] = (pages, pages.version, n)
            else:
                table[i, :n] = pages
                written += n
                held[i] = None
        self.pages_written += written

    def forget(self, start: int, stop: int) -> None:
        """Rows [start, stop) were written by someone else (a padded row's page 0)."""
        for i in range(start, min(stop, len(self._held))):
            self._held[i] = None
