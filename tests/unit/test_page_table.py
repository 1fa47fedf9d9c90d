"""The decode graphs' incremental host page table (runtime/engine/page_table.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from runtime.engine.page_table import PageList, PageTableRows


@pytest.mark.parametrize("change", [
    lambda p: p.__setitem__(0, 9), lambda p: p.__setitem__(slice(0, 2), [7, 7]), lambda p: p.__delitem__(-1),
    lambda p: p.__delitem__(slice(1, None)), lambda p: p.clear(), lambda p: p.insert(0, 5), lambda p: p.pop(),
    lambda p: p.remove(2), lambda p: p.reverse(), lambda p: p.sort(), lambda p: p.__imul__(2),
])
def test_page_list_counts_every_change_but_appending(change) -> None:
    p = PageList([3, 2, 1])
    p.append(4)
    p.extend([5])
    p += [6]
    assert p.version == 0 and p == [3, 2, 1, 4, 5, 6]
    change(p)
    assert p.version == 1


def _check(table: np.ndarray, lists: list[list[int]]) -> None:
    for i, pages in enumerate(lists):
        assert table[i, : len(pages)].tolist() == list(pages), f"row {i}"


def test_rows_follow_their_lists_through_every_kind_of_change() -> None:
    """A random serving-like run: sequences grow by a page now and then, shrink (rolled-back
    drafts), get their head pages replaced in place (the prefix cache's dedupe), finish
    (rows shift up), are replaced by new ones, share a list across verify rows, and plain
    lists (a drafter's) come and go; after every fill each row holds its list exactly, and
    steady steps write only the appended pages."""
    rng = random.Random(0)
    table = np.full((32, 64), -1, dtype=np.int32)
    rows = PageTableRows(table)
    next_page = iter(range(10**6))
    seqs = [PageList(next(next_page) for _ in range(rng.randint(1, 20))) for _ in range(12)]
    for step in range(400):
        for p in seqs:
            r = rng.random()
            if r < 0.2 and len(p) < 60:
                p.append(next(next_page))
            elif r < 0.23 and len(p) > 1:
                del p[rng.randint(1, len(p) - 1):]
            elif r < 0.25:
                p[: len(p) // 2] = [next(next_page) for _ in range(len(p) // 2)]
        if rng.random() < 0.05:
            seqs.pop(rng.randrange(len(seqs)))
        if rng.random() < 0.05 and len(seqs) < 14:
            seqs.insert(rng.randrange(len(seqs) + 1), PageList(next(next_page) for _ in range(rng.randint(1, 20))))
        lists: list[list[int]] = []
        for p in seqs:
            lists += [p] * (3 if rng.random() < 0.1 else 1)  # verify rows share the list
        if rng.random() < 0.1:  # a drafter's plain list in some row
            lists[rng.randrange(len(lists))] = [next(next_page) for _ in range(5)]
        lists = lists[:32]
        rows.fill(lists)
        _check(table, lists)
        if rng.random() < 0.1:  # padded rows written by the caller
            table[len(lists):, 0] = 0
            rows.forget(len(lists), 32)
    # Steady decode: nothing changes but one appended page in one row.
    lists = list(seqs)
    rows.fill(lists)
    before = rows.pages_written
    rows.fill(lists)
    assert rows.pages_written == before  # nothing changed: nothing written
    seqs[0].append(next(next_page))
    rows.fill(lists)
    _check(table, lists)
    assert rows.pages_written == before + 1  # the one appended page


def test_a_new_list_object_at_a_row_is_written_whole_even_with_equal_length() -> None:
    table = np.zeros((2, 8), dtype=np.int32)
    rows = PageTableRows(table)
    rows.fill([PageList([1, 2, 3])])
    rows.fill([PageList([4, 5, 6])])  # another sequence in row 0, same length, version 0
    assert table[0, :3].tolist() == [4, 5, 6]


def test_every_request_keeps_a_page_list_through_serving(tiny_model_dir: str) -> None:
    """The scheduler gives requests PageLists on admission, prefix-cache matches, prefilled
    arrivals and releases, so the graphs' rows are kept for every sequence: checked at every
    step of a run with shared prefixes (cache hits and dedupe) and a pool small enough to
    retract and re-admit requests."""
    from runtime import Engine, SamplingParams

    eng = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, kv_cache_tokens=160, max_running=8)
    core = eng.core
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    shared = list(range(20, 40))
    reqs = [core.add_request(f"r{i}", shared + [50 + i] * (i + 1), params) for i in range(8)]
    while core.has_work:
        core.step()
        for r in core.scheduler.running:
            assert type(r.pages) is PageList, r.rid
    assert core.scheduler.num_retractions > 0  # the pool was small enough to retract
    assert all(len(r.output_ids) == 24 and type(r.pages) is PageList for r in reqs)
    eng.shutdown()
