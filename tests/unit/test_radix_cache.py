"""The radix prefix cache: page-granular matching, ownership of pages, LRU eviction, no leaks."""
from __future__ import annotations

import random

import pytest
import torch

from runtime.engine.kv_pool import KVPool
from runtime.engine.radix_cache import Match, NoPrefixCache, RadixCache, duplicate_pages

PS = 4


def make(num_pages: int = 64, page_size: int = PS) -> tuple[KVPool, RadixCache]:
    pool = KVPool(1, num_pages, page_size, 1, 1, torch.float32, "cpu")
    return pool, RadixCache(pool, page_size)


def check(pool: KVPool, cache: RadixCache, held_by_caller: int = 0) -> None:
    cache.check_invariants()
    pool.check_no_leak(held=cache.cached_pages + held_by_caller)


def cache_seq(pool: KVPool, cache: RadixCache, tokens: list[int]) -> tuple[int, Match, list[int]]:
    """A finished request: match, compute the rest into fresh pages, insert, free what the
    cache did not keep. Returns (n_dup, insert match, the pages the request used)."""
    m = cache.match(tokens)
    cache.lock(m.node)
    n_full = len(tokens) // cache.page_size
    partial = 1 if len(tokens) % cache.page_size else 0
    own = pool.alloc(n_full - len(m.pages) + partial)
    pages = m.pages + own
    n_dup, m2 = cache.insert(tokens, pages[:n_full])
    pool.free(duplicate_pages(pages[:n_full], m2))
    pool.free(pages[len(m2.pages) :])
    cache.unlock(m.node)
    return n_dup, m2, pages


def test_match_on_empty_cache() -> None:
    pool, cache = make()
    m = cache.match([1, 2, 3, 4, 5, 6, 7, 8])
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    assert cache.match([]).num_tokens == 0
    assert cache.stats().queried_tokens == 8 and cache.stats().hit_rate == 0.0
    check(pool, cache)


def test_insert_then_match_full_and_partial() -> None:
    pool, cache = make()
    seq = list(range(10, 22))  # 3 pages
    pages = pool.alloc(3)
    n_dup, m = cache.insert(seq, pages)
    assert n_dup == 0 and m.pages == pages and m.num_tokens == 12
    assert cache.cached_pages == 3 and cache.evictable_pages == 3
    check(pool, cache)

    assert cache.match(seq).pages == pages
    assert cache.match(seq + [99, 98]).pages == pages  # longer query: whole cached prefix
    m = cache.match(seq[:10])  # 2.5 pages: the partial page is not matched
    assert m.pages == pages[:2] and m.num_tokens == 8
    m = cache.match(seq[:5] + [0, 0, 0, 0])  # diverges inside page 2: only page 1 matches
    assert m.pages == pages[:1] and m.num_tokens == 4
    assert cache.match([0] + seq[1:]).num_tokens == 0
    st = cache.stats()
    assert st.queried_tokens == 12 + 14 + 10 + 9 + 12
    assert st.matched_tokens == 12 + 12 + 8 + 4
    check(pool, cache)


def test_insert_rejects_too_few_tokens() -> None:
    pool, cache = make()
    with pytest.raises(ValueError, match="need 8 tokens"):
        cache.insert([1, 2, 3], pool.alloc(2))


def test_page_size_must_match_pool() -> None:
    pool = KVPool(1, 8, 4, 1, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(pool, 8)


def test_split_at_page_boundary_shares_only_common_pages() -> None:
    pool, cache = make()
    a = list(range(16))  # 4 pages
    _, ma, _ = cache_seq(pool, cache, a)
    b = a[:8] + [100 + t for t in range(8)]  # diverges at a page boundary after 2 pages
    n_dup, mb, used = cache_seq(pool, cache, b)
    assert n_dup == 8
    assert mb.pages[:2] == ma.pages[:2] and used[:2] == ma.pages[:2]
    assert set(mb.pages[2:]).isdisjoint(ma.pages)
    assert cache.cached_pages == 6
    # both full sequences still match, and a lock on the old deep node survives the split
    assert cache.match(a).pages == ma.pages and cache.match(b).pages == mb.pages
    cache.lock(ma.node)
    assert cache.evictable_pages == 2  # only b's own 2 pages
    cache.unlock(ma.node)
    check(pool, cache)


def test_divergence_mid_page_shares_only_full_pages() -> None:
    pool, cache = make()
    a = list(range(16))
    _, ma, _ = cache_seq(pool, cache, a)
    c = a[:10] + [200, 201, 202, 203, 204, 205]  # diverges inside page 3 (tokens 8..11)
    n_dup, mc, _ = cache_seq(pool, cache, c)
    assert n_dup == 8
    assert mc.pages[:2] == ma.pages[:2] and mc.pages[2] not in ma.pages
    assert cache.cached_pages == 4 + 2
    assert cache.match(c[:12]).pages == mc.pages[:3]
    check(pool, cache)


def test_duplicate_insert_returns_n_dup_and_caller_frees_duplicates() -> None:
    pool, cache = make()
    seq = list(range(12)) + [7, 7]  # 3 full pages + a partial one
    first = pool.alloc(4)
    _, m1 = cache.insert(seq, first[:3])
    pool.free(first[3:])
    check(pool, cache)

    # a second request computed the same prompt without matching (e.g. it raced the first)
    second = pool.alloc(4)
    n_dup, m2 = cache.insert(seq, second[:3])
    assert n_dup == 12 and m2.pages == m1.pages
    assert duplicate_pages(second[:3], m2) == second[:3]
    pool.free(duplicate_pages(second[:3], m2))
    pool.free(second[len(m2.pages) :])
    check(pool, cache)

    # a request that matched 2 pages then computed 2 more: its matched pages are the tree's
    m = cache.match(seq[:8])
    cache.lock(m.node)
    own = pool.alloc(2)
    longer = seq[:12] + [50, 51, 52, 53]
    n_dup, m3 = cache.insert(longer, m.pages + own)
    assert n_dup == 12
    assert duplicate_pages(m.pages + own, m3) == own[:1]  # page 3 was cached; page 4 is new
    pool.free(duplicate_pages(m.pages + own, m3))
    assert m3.pages == m1.pages + own[1:]
    cache.unlock(m.node)
    check(pool, cache)
    assert cache.cached_pages == 4


def test_lock_prevents_eviction_and_unlock_allows_it() -> None:
    pool, cache = make()
    _, m, _ = cache_seq(pool, cache, list(range(12)))
    cache.lock(m.node)
    assert cache.evictable_pages == 0
    assert cache.evict(3) == 0
    assert cache.match(list(range(12))).num_tokens == 12
    check(pool, cache)
    cache.unlock(m.node)
    assert cache.evictable_pages == 3
    assert cache.evict(3) == 3
    assert cache.cached_pages == 0 and cache.match(list(range(12))).num_tokens == 0
    check(pool, cache)
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(m.node)
    with pytest.raises(RuntimeError):
        cache.unlock(cache.root)


def test_locked_prefix_protects_ancestors_only() -> None:
    pool, cache = make()
    a = list(range(12))
    b = a[:4] + [90, 91, 92, 93]
    _, ma, _ = cache_seq(pool, cache, a)
    _, mb, _ = cache_seq(pool, cache, b)
    cache.lock(mb.node)  # pins the shared first page and b's second page
    assert cache.evictable_pages == 2
    assert cache.evict(10) == 2
    assert cache.match(a).pages == ma.pages[:1]
    assert cache.match(b).pages == mb.pages
    cache.unlock(mb.node)
    check(pool, cache)


def test_eviction_is_lru_and_parents_follow_children() -> None:
    pool, cache = make()
    base = list(range(8))  # shared 2 pages
    x = base + [100, 101, 102, 103]
    y = base + [200, 201, 202, 203]
    z = [300, 301, 302, 303]
    for s in (x, y, z):
        cache_seq(pool, cache, s)
    cache.match(x)  # x (and the shared base) now most recent; y's leaf and z are older
    assert cache.cached_pages == 5

    assert cache.evict(1) == 1  # y's leaf is the least recently used
    assert cache.match(y).num_tokens == 8
    assert cache.match(z).num_tokens == 4  # matching refreshes z: now x's leaf is oldest
    assert cache.evict(1) == 1
    assert cache.match(x).num_tokens == 8
    check(pool, cache)
    cache.match(z)  # the shared base, now a leaf itself, is older than z
    assert cache.evict(2) == 2  # base (2 pages, its children gone) goes before z
    assert cache.match(base).num_tokens == 0 and cache.match(z).num_tokens == 4
    check(pool, cache)


def test_eviction_trims_the_tail_of_a_long_leaf() -> None:
    pool, cache = make()
    s = list(range(20))  # 5 pages in one edge
    _, m, _ = cache_seq(pool, cache, s)
    assert cache.evict(2) == 2
    assert cache.match(s).pages == m.pages[:3]
    with pytest.raises(RuntimeError, match="evicted"):  # the stale 5-page match is gone
        cache.lock(m.node)
    check(pool, cache)


def test_evict_more_than_evictable_frees_only_what_it_can() -> None:
    pool, cache = make()
    _, ma, _ = cache_seq(pool, cache, list(range(8)))
    cache_seq(pool, cache, [50 + t for t in range(12)])
    cache.lock(ma.node)
    assert cache.evictable_pages == 3
    assert cache.evict(100) == 3
    assert cache.cached_pages == 2 and cache.evictable_pages == 0
    check(pool, cache)
    cache.unlock(ma.node)
    assert cache.evict(0) == 0 and cache.evict(100) == 2
    check(pool, cache)


def test_reset_frees_everything_and_refuses_while_locked() -> None:
    pool, cache = make()
    _, m, _ = cache_seq(pool, cache, list(range(8)))
    cache_seq(pool, cache, list(range(4)) + [9] * 8)
    cache.lock(m.node)
    with pytest.raises(RuntimeError, match="lock"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert cache.cached_pages == 0 and cache.evictable_pages == 0
    assert cache.match(list(range(8))).num_tokens == 0
    check(pool, cache)
    pool.check_no_leak(held=0)


def test_page_size_one_and_tensor_tokens() -> None:
    pool, cache = make(page_size=1)
    seq = torch.tensor([5, 6, 7])
    _, m = cache.insert(seq, pool.alloc(3))
    assert cache.match([5, 6, 9]).pages == m.pages[:2]
    assert cache.match(torch.tensor([5, 6, 7, 8])).num_tokens == 3
    check(pool, cache)


def test_no_prefix_cache_leaves_pages_with_the_caller() -> None:
    pool = KVPool(1, 16, PS, 1, 1, torch.float32, "cpu")
    cache = NoPrefixCache(PS)
    seq = list(range(10))
    m = cache.match(seq)
    assert m.num_tokens == 0 and m.pages == []
    cache.lock(m.node)
    pages = pool.alloc(3)
    n_dup, m2 = cache.insert(seq, pages[:2])
    assert n_dup == 0 and m2.pages == [] and m2.num_tokens == 0
    assert duplicate_pages(pages[:2], m2) == []
    pool.free(pages[len(m2.pages) :])  # the same code path as with RadixCache
    cache.unlock(m.node)
    pool.check_no_leak(held=cache.cached_pages)
    assert cache.evict(5) == 0 and cache.evictable_pages == 0
    assert cache.stats().queried_tokens == 10 and cache.stats().matched_tokens == 0
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)
    cache.reset()


class RefCache:
    """Reference model: a dict from each cached full-page prefix to its page, with per-page
    LRU times, evicting one page-level leaf at a time."""

    def __init__(self, ps: int) -> None:
        self.ps = ps
        self.pages: dict[tuple[int, ...], int] = {}
        self.time: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[int, ...]] = []
        self.clock = 0

    def _prefixes(self, tokens: list[int], n: int) -> list[tuple[int, ...]]:
        return [tuple(tokens[: (j + 1) * self.ps]) for j in range(n)]

    def match(self, tokens: list[int]) -> list[int]:
        self.clock += 1
        out = []
        for p in self._prefixes(tokens, len(tokens) // self.ps):
            if p not in self.pages:
                break
            self.time[p] = self.clock
            out.append(self.pages[p])
        return out

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        self.clock += 1
        n_dup = 0
        for p, page in zip(self._prefixes(tokens, len(pages)), pages):
            if p in self.pages:
                n_dup += self.ps
            else:
                self.pages[p] = page
            self.time[p] = self.clock
        return n_dup

    def locked(self) -> set[tuple[int, ...]]:
        return {k[: j * self.ps] for k in self.locks for j in range(1, len(k) // self.ps + 1)}

    def evict(self, n: int) -> list[int]:
        freed = []
        locked = self.locked()
        while len(freed) < n:
            parents = {p[: -self.ps] for p in self.pages}
            cands = [p for p in self.pages if p not in parents and p not in locked]
            if not cands:
                break
            victim = min(cands, key=lambda p: self.time[p])
            freed.append(self.pages.pop(victim))
            del self.time[victim]
        return freed


def tree_contents(cache: RadixCache) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for j, page in enumerate(node.pages):
            out[prefix + node.key[: (j + 1) * cache.page_size]] = page
        stack.extend((c, prefix + node.key) for c in node.children.values())
    return out


@pytest.mark.parametrize("seed,ps", [(0, 1), (1, 2), (2, 3), (3, 2), (4, 4)])
def test_random_ops_against_reference(seed: int, ps: int) -> None:
    rng = random.Random(seed)
    pool = KVPool(1, 48, ps, 1, 1, torch.float32, "cpu")
    cache = RadixCache(pool, ps)
    ref = RefCache(ps)
    held: list[tuple[Match, tuple[int, ...]]] = []  # locks the "requests" still hold
    stems = [[rng.randrange(3) for _ in range(rng.randrange(0, 10))] for _ in range(4)]

    def random_seq() -> list[int]:
        return rng.choice(stems)[: rng.randrange(0, 10)] + [rng.randrange(3) for _ in range(rng.randrange(0, 8))]

    for _ in range(600):
        op = rng.random()
        if op < 0.5:  # a request: match, lock, compute the rest, insert, maybe keep the lock
            seq = random_seq()
            m = cache.match(seq)
            assert m.pages == ref.match(seq)
            assert m.num_tokens == len(m.pages) * ps
            cache.lock(m.node)
            ref.locks.append(tuple(seq[: m.num_tokens]))
            n_full = len(seq) // ps
            need = n_full - len(m.pages) + (1 if len(seq) % ps else 0)
            if pool.num_free < need:
                short = need - pool.num_free
                freed = cache.evict(short)
                ref_freed = ref.evict(short)
                assert freed == len(ref_freed)
            if pool.num_free < need:  # out of memory: the request is dropped
                cache.unlock(m.node)
                ref.locks.remove(tuple(seq[: m.num_tokens]))
            else:
                pages = m.pages + pool.alloc(need)
                n_dup, m2 = cache.insert(seq, pages[:n_full])
                assert n_dup == ref.insert(seq, pages[:n_full])
                assert m2.num_tokens == n_full * ps and len(m2.pages) == n_full
                pool.free(duplicate_pages(pages[:n_full], m2))
                pool.free(pages[len(m2.pages) :])
                cache.unlock(m.node)
                ref.locks.remove(tuple(seq[: m.num_tokens]))
                if rng.random() < 0.4:
                    cache.lock(m2.node)
                    ref.locks.append(tuple(seq[: m2.num_tokens]))
                    held.append((m2, tuple(seq[: m2.num_tokens])))
        elif op < 0.7 and held:
            m, key = held.pop(rng.randrange(len(held)))
            cache.unlock(m.node)
            ref.locks.remove(key)
        elif op < 0.85:
            seq = random_seq()
            assert cache.match(seq).pages == ref.match(seq)
        else:
            n = rng.randrange(0, 8)
            before = cache.evictable_pages
            freed = cache.evict(n)
            assert freed == len(ref.evict(n)) == min(n, before)
        cache.check_invariants()
        pool.check_no_leak(held=cache.cached_pages)
        assert tree_contents(cache) == ref.pages
        assert cache.evictable_pages == len(set(ref.pages) - ref.locked())
    for m, _ in held:
        cache.unlock(m.node)
    assert cache.evictable_pages == cache.cached_pages
    cache.reset()
    pool.check_no_leak(held=0)
