"""Prefix cache over the paged KV pool: a radix tree of token ids, one page per edge step.

RadixAttention (SGLang) at page granularity: an edge's key is a whole number of pages
(`page_size` token ids each), a node owns the KV pages of its edge, and nodes split only at
page boundaries. A trailing partial page is never cached, so two prompts share exactly
their common full pages.

Ownership protocol (the same code is correct for `RadixCache` and `NoPrefixCache`):

    m = cache.match(prompt)        # longest cached prefix, m.pages are the cache's
    cache.lock(m.node)             # BEFORE any evict/alloc: an unlocked match may be evicted
    need = pages for the rest; if pool.num_free < need: cache.evict(need - pool.num_free)
    own = pool.alloc(need); pages = m.pages + own     # compute KV into `own`
    ...
    full = pages[:n_kv_tokens // page_size]           # only full pages; the partial one is yours
    n_dup, m2 = cache.insert(kv_tokens, full)
    pool.free(duplicate_pages(full, m2))              # pages someone else cached meanwhile
    mine = pages[len(m2.pages):]                      # still the caller's (partial page, or all
                                                      # of them with NoPrefixCache)
    finished:   pool.free(mine); cache.unlock(m.node)
    continuing: cache.lock(m2.node); cache.unlock(m.node); pages = m2.pages + mine

The rule behind it: after `insert`, the cache owns exactly `match.pages` (the first
`match.num_tokens` tokens). Of the pages the caller passed, those at positions below
`len(match.pages)` that are not the very same page as `match.pages[i]` are duplicates the
caller must free; those at later positions stay the caller's. `RadixCache` always caches
everything passed (`len(match.pages) == len(pages)`); `NoPrefixCache` caches nothing
(`match.pages == []`), so the caller keeps and frees all its pages.

A `Match` is only a snapshot: its node stays valid while locked. Locking a node that
eviction removed raises. Callers that need the logits of the last prompt token must leave
at least one token uncached, e.g. `match(prompt[:-1])`.
"""
from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.engine.kv_pool import KVPool

_node_ids = itertools.count()


class Node:
    __slots__ = ("parent", "children", "key", "pages", "ref", "last_access", "id")

    def __init__(self, parent: Node | None, key: tuple[int, ...], pages: list[int], last_access: int) -> None:
        self.parent = parent
        # first page of the child's key (page_size ids) -> child
        self.children: dict[tuple[int, ...], Node] = {}
        self.key = key  # token ids of this edge, len = len(pages) * page_size
        self.pages = pages  # KV page ids of this edge, one per page_size tokens
        self.ref = 0  # locks on this node or any descendant
        self.last_access = last_access
        self.id = next(_node_ids)  # stable tie-break for the eviction heap

    def __repr__(self) -> str:
        return f"Node(id={self.id}, pages={len(self.pages)}, ref={self.ref}, t={self.last_access})"


@dataclass
class Match:
    pages: list[int]  # page ids of the matched prefix, len = num_tokens // page_size
    num_tokens: int  # matched tokens, a multiple of page_size
    node: Node  # deepest matched node (root when nothing matched); pass to lock/unlock


@dataclass(frozen=True)
class CacheStats:
    queried_tokens: int  # tokens passed to match()
    matched_tokens: int  # of those, served from the cache

    @property
    def hit_rate(self) -> float:
        return self.matched_tokens / self.queried_tokens if self.queried_tokens else 0.0


def duplicate_pages(pages: Sequence[int], match: Match) -> list[int]:
    """The caller's pages that `insert` made redundant (to free): see the module docstring."""
    return [p for p, q in zip(pages, match.pages) if p != q]


def _as_tuple(tokens: Sequence[int], n: int) -> tuple[int, ...]:
    if hasattr(tokens, "tolist"):  # tensors / numpy arrays: hash by value, not identity
        tokens = tokens.tolist()
    return tuple(tokens[:n])


class PrefixCache(ABC):
    page_size: int

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 (got {page_size})")
        self.page_size = page_size
        self._queried_tokens = 0
        self._matched_tokens = 0

    @abstractmethod
    def match(self, tokens: Sequence[int]) -> Match:
        """Longest cached prefix of `tokens`, in whole pages. Touches LRU time of the path. Does not lock."""

    @abstractmethod
    def lock(self, node: Node) -> None:
        """Pin `node` and its ancestors: their pages are not evicted until unlock."""

    @abstractmethod
    def unlock(self, node: Node) -> None: ...

    @abstractmethod
    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[int, Match]:
        """Cache tokens[:len(pages) * page_size], whose KV is in `pages`.

        Returns (n_dup, match): n_dup leading tokens were cached before this call; `match` is
        what the cache now holds of this prefix. The caller frees `duplicate_pages(pages,
        match)` and keeps `pages[len(match.pages):]`.
        """

    @abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unlocked pages to the pool, least recently used first."""

    @property
    @abstractmethod
    def evictable_pages(self) -> int: ...

    @property
    @abstractmethod
    def cached_pages(self) -> int: ...

    @abstractmethod
    def reset(self) -> None:
        """Free every cached page (raises if anything is locked). Hit-rate counters are kept."""

    def stats(self) -> CacheStats:
        return CacheStats(self._queried_tokens, self._matched_tokens)


class RadixCache(PrefixCache):
    def __init__(self, pool: KVPool, page_size: int) -> None:
        super().__init__(page_size)
        if page_size != pool.page_size:
            raise ValueError(f"cache page_size {page_size} != KV pool page_size {pool.page_size}")
        self.pool = pool
        self._clock = 0
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = Node(None, (), [], 0)
        self._cached = 0
        self._evictable = 0
        self._leaves: set[Node] = set()  # non-root nodes without children (eviction candidates)
        # Eviction candidates, (last_access, id, node), kept across calls: rebuilding it from
        # every leaf at each evict cost O(leaves) per page freed, and a full cache of a
        # long run (10k+ leaves, an evict per request every page_size decoded tokens) made
        # steps 100x slower. Entries go stale (the node was touched, locked, split or
        # evicted since); evict checks each one it pops (see _fresh).
        self._heap: list[tuple[int, int, Node]] = []

    # -- queries ---------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> Match:
        n_pages = len(tokens) // self.page_size
        node, pages = self._walk(_as_tuple(tokens, n_pages * self.page_size))
        num_tokens = len(pages) * self.page_size
        self._queried_tokens += len(tokens)
        self._matched_tokens += num_tokens
        return Match(pages, num_tokens, node)

    def _walk(self, key: tuple[int, ...]) -> tuple[Node, list[int]]:
        """Follow `key` (whole pages) down the tree, splitting the last edge where the match
        ends inside it, so the returned node covers exactly the matched prefix. Touches the path."""
        ps = self.page_size
        self._clock += 1
        node, pages, i = self.root, [], 0  # i: matched tokens
        while i < len(key):
            child = node.children.get(key[i : i + ps])
            if child is None:
                break
            n = min(len(child.key), len(key) - i)
            if child.key[:n] == key[i : i + n]:
                k = n // ps  # matched pages of this edge
            else:
                k = next(j for j in range(ps, n) if child.key[j] != key[i + j]) // ps
            if k < len(child.pages):
                child = self._split(child, k)
            child.last_access = self._clock
            pages.extend(child.pages)
            node = child
            i += len(child.key)
            if len(child.key) != n:  # stopped inside the original edge
                break
        return node, pages

    def _split(self, child: Node, k: int) -> Node:
        """Cut `child`'s edge after k pages; returns the new upper node. `child` keeps the
        suffix (so its full path, and any Match/lock naming it, is unchanged)."""
        ps = self.page_size
        parent = child.parent
        assert parent is not None and 0 < k < len(child.pages)
        upper = Node(parent, child.key[: k * ps], child.pages[:k], child.last_access)
        upper.ref = child.ref
        parent.children[upper.key[:ps]] = upper
        child.key, child.pages, child.parent = child.key[k * ps :], child.pages[k:], upper
        upper.children[child.key[:ps]] = child
        return upper

    # -- locking ---------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        if node is not self.root and node.parent is None:
            raise RuntimeError(f"{node} was evicted: lock a match before anything can evict it")
        while node is not None:
            if node.ref == 0:
                self._evictable -= len(node.pages)
            node.ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        if node is not self.root and node.parent is None:
            raise RuntimeError(f"{node} is not in the cache (unlocked after eviction?)")
        while node is not None:
            if node.ref <= 0:
                raise RuntimeError(f"unlock of {node} without a matching lock")
            node.ref -= 1
            if node.ref == 0:
                self._evictable += len(node.pages)
                if node in self._leaves:
                    self._push(node)
            node = node.parent

    # -- insertion and eviction ---------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[int, Match]:
        ps = self.page_size
        n = len(pages)
        if len(tokens) < n * ps:
            raise ValueError(f"insert: {n} pages need {n * ps} tokens, got {len(tokens)}")
        key = _as_tuple(tokens, n * ps)
        node, cached = self._walk(key)
        n_dup = len(cached) * ps
        if len(cached) < n:
            new = Node(node, key[n_dup:], list(pages[len(cached) :]), self._clock)
            node.children[new.key[:ps]] = new
            self._leaves.discard(node)
            self._leaves.add(new)
            if new.ref == 0:
                self._push(new)
            self._cached += len(new.pages)
            self._evictable += len(new.pages)
            cached = cached + new.pages
            node = new
        return n_dup, Match(cached, n * ps, node)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 4 * len(self._leaves) + 64:  # mostly stale: start over from the leaves
            self._heap = [(n.last_access, n.id, n) for n in self._leaves if n.ref == 0]
            heapq.heapify(self._heap)

    def _fresh(self, entry: tuple[int, int, Node]) -> bool:
        """Whether a popped heap entry names an evictable leaf with its current access time.
        A touched leaf is pushed again with its new time (it may still be the oldest)."""
        access, _, node = entry
        if node.parent is None or node.ref or node not in self._leaves:
            return False  # evicted, locked (unlock pushes it again) or no longer a leaf
        if access != node.last_access:
            heapq.heappush(self._heap, (node.last_access, node.id, node))
            return False
        return True

    def evict(self, num_pages: int) -> int:
        heap = self._heap
        freed = 0
        while freed < num_pages and heap:
            entry = heapq.heappop(heap)
            if not self._fresh(entry):
                continue
            leaf = entry[2]
            take = min(len(leaf.pages), num_pages - freed)
            if take < len(leaf.pages):  # free only the tail; the head stays cached
                self._leaves.add(self._split(leaf, len(leaf.pages) - take))
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            self._leaves.discard(leaf)
            leaf.parent = None  # marks it dead for lock()
            self.pool.free(leaf.pages)
            self._cached -= take
            self._evictable -= take
            freed += take
            if parent is not self.root and not parent.children:
                self._leaves.add(parent)
                if parent.ref == 0:
                    heapq.heappush(heap, (parent.last_access, parent.id, parent))
        self._compact()
        return freed

    @property
    def evictable_pages(self) -> int:
        return self._evictable

    @property
    def cached_pages(self) -> int:
        return self._cached

    def reset(self) -> None:
        if self.root.ref:
            raise RuntimeError(f"reset of the prefix cache with {self.root.ref} lock(s) held")
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            self.pool.free(node.pages)
            node.parent = None
            stack.extend(node.children.values())
        self._init_tree()

    # -- testing -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        ps = self.page_size
        seen: set[int] = set()
        cached = evictable = 0
        leaves: set[Node] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            assert node.ref >= 0, node
            assert node.ref >= sum(c.ref for c in node.children.values()), node
            if node is not self.root:
                assert node.pages and len(node.key) == len(node.pages) * ps, node
                assert node.parent is not None and node.parent.children.get(node.key[:ps]) is node, node
                assert node.last_access <= node.parent.last_access or node.parent is self.root, node
                cached += len(node.pages)
                evictable += len(node.pages) if node.ref == 0 else 0
                if not node.children:
                    leaves.add(node)
            for p in node.pages:
                assert p not in seen, f"page {p} held twice in the tree"
                seen.add(p)
            for first, child in node.children.items():
                assert child.key[:ps] == first and child.parent is node, child
                stack.append(child)
        assert cached == self._cached, (cached, self._cached)
        assert evictable == self._evictable, (evictable, self._evictable)
        assert leaves == self._leaves, "leaf set out of date"
        queued = {id(entry[2]) for entry in self._heap}
        assert all(id(n) in queued for n in leaves if n.ref == 0), "an evictable leaf has no heap entry"
        assert len(self._heap) <= 4 * len(leaves) + 64, "the eviction heap keeps stale entries without bound"


class NoPrefixCache(PrefixCache):
    """The off switch: matches nothing and caches nothing, so `insert` leaves every page with
    the caller. Lock counts are still kept, to catch unbalanced lock/unlock in tests."""

    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self.root = Node(None, (), [], 0)

    def match(self, tokens: Sequence[int]) -> Match:
        self._queried_tokens += len(tokens)
        return Match([], 0, self.root)

    def lock(self, node: Node) -> None:
        if node is not self.root:
            raise RuntimeError(f"{node} does not belong to this cache")
        node.ref += 1

    def unlock(self, node: Node) -> None:
        if node is not self.root or node.ref <= 0:
            raise RuntimeError(f"unlock of {node} without a matching lock")
        node.ref -= 1

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[int, Match]:
        if len(tokens) < len(pages) * self.page_size:
            raise ValueError(f"insert: {len(pages)} pages need {len(pages) * self.page_size} tokens, got {len(tokens)}")
        return 0, Match([], 0, self.root)

    def evict(self, num_pages: int) -> int:
        return 0

    @property
    def evictable_pages(self) -> int:
        return 0

    @property
    def cached_pages(self) -> int:
        return 0

    def reset(self) -> None:
        if self.root.ref:
            raise RuntimeError(f"reset of the prefix cache with {self.root.ref} lock(s) held")
