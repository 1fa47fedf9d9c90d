"""Routing policies: which prefill worker and which decode replica serve a request."""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Load:
    id: int
    running: int = 0
    queued: int = 0
    kv_free_pages: int = 0
    kv_total_pages: int = 1
    inflight: int = 0  # dispatched by the controller and not yet reported done

    @property
    def queue(self) -> int:
        # Heartbeats lag; the controller's own count of what it sent covers the gap.
        return max(self.running + self.queued, self.inflight)

    @property
    def kv_used(self) -> float:
        return 1.0 - self.kv_free_pages / max(1, self.kv_total_pages)


class PrefixIndex:
    """An approximate radix tree of what each prefill worker has cached: the hash of every
    block-aligned prompt prefix it was sent, bounded LRU. Approximate because the worker may
    have evicted it since; a wrong guess costs a recompute, never a wrong answer."""

    def __init__(self, block: int = 16, capacity: int = 200_000) -> None:
        self.block = block
        self.capacity = capacity
        self._owners: OrderedDict[int, set[int]] = OrderedDict()

    def _hashes(self, tokens: list[int]) -> list[int]:
        out, h = [], 0
        for i in range(self.block, len(tokens) + 1, self.block):
            h = hash((h, tuple(tokens[i - self.block : i])))
            out.append(h)
        return out

    def matched_blocks(self, tokens: list[int], workers: list[int]) -> dict[int, int]:
        best = dict.fromkeys(workers, 0)
        alive = set(workers)
        for n, h in enumerate(self._hashes(tokens), start=1):
            owners = self._owners.get(h)
            if not owners or not owners & alive:
                break
            alive &= owners
            for w in alive:
                best[w] = n
        return best

    def record(self, tokens: list[int], worker: int) -> None:
        for h in self._hashes(tokens):
            self._owners.setdefault(h, set()).add(worker)
            self._owners.move_to_end(h)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def forget_worker(self, worker: int) -> None:
        for owners in self._owners.values():
            owners.discard(worker)


class Router:
    def __init__(self, policy: str, block: int = 16, imbalance: int = 4) -> None:
        self.policy = policy
        self.index = PrefixIndex(block)
        self.imbalance = imbalance  # queue difference a prefix hit may not exceed
        self._rr_prefill = itertools.count()
        self._rr_decode = itertools.count()

    def pick_prefill(self, tokens: list[int], loads: list[Load]) -> Load:
        if self.policy == "round_robin":
            choice = loads[next(self._rr_prefill) % len(loads)]
        else:
            shortest = min(loads, key=lambda w: (w.queue, w.id))
            choice = shortest
            if self.policy == "prefix_aware":
                hits = self.index.matched_blocks(tokens, [w.id for w in loads])
                best = max(loads, key=lambda w: (hits[w.id], -w.queue))
                if hits[best.id] and best.queue <= shortest.queue + self.imbalance:
                    choice = best
        self.index.record(tokens, choice.id)
        return choice

    def pick_decode(self, loads: list[Load]) -> Load:
        if self.policy == "round_robin":
            return loads[next(self._rr_decode) % len(loads)]
        return min(loads, key=lambda w: (w.queue, w.kv_used, w.id))
