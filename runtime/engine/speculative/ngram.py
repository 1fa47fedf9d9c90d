"""Prompt-lookup (n-gram) drafting: find the latest earlier occurrence of the sequence's
last n tokens (n from max_n down to min_n, within the last `window` tokens) and propose the
tokens that followed it.

A per-request index makes each proposal O(max_n + k) instead of a scan of the window: for
every n it maps each n-gram that already has a continuation to its latest start, and it is
extended by the tokens appended since the last proposal (the prompt is indexed once, at the
first). A scan of a 4096-token window costs milliseconds of Python per request and step,
more than the verify forward it feeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.engine.speculative.base import Drafter
from runtime.engine.request import Req


@dataclass
class _Index:
    tokens: list[int] = field(default_factory=list)  # the sequence indexed so far
    # latest[n - min_n]: n-gram -> start of its latest occurrence that has a continuation
    latest: list[dict[tuple[int, ...], int]] = field(default_factory=list)


class NgramDrafter(Drafter):
    name = "ngram"
    reads_hidden = False  # it reads the request's tokens, at the next proposal

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.max_n, self.min_n, self.window = max_n, min_n, window
        self._index: dict[str, _Index] = {}

    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for req in reqs:
            d = self._lookup(self._index_for(req), k)
            if d:
                out[req.rid] = d
        return out

    def _index_for(self, req: Req) -> _Index:
        """req's index, extended by the tokens it gained since the last proposal."""
        idx = self._index.get(req.rid)
        if idx is None or len(idx.tokens) > req.seq_len:  # a new request under a reused id
            idx = self._index[req.rid] = self._new_index()
        known, n_prompt = len(idx.tokens), len(req.prompt_ids)
        self._extend(idx, req.prompt_ids[known:])
        self._extend(idx, req.output_ids[max(0, known - n_prompt):])
        return idx

    def _new_index(self) -> _Index:
        return _Index(latest=[{} for _ in range(self.max_n - self.min_n + 1)])

    def release(self, req: Req) -> None:
        self._index.pop(req.rid, None)

    def _extend(self, idx: _Index, new: list[int]) -> None:
        toks = idx.tokens
        for t in new:
            p = len(toks)  # t lands at position p: every n-gram ending at p - 1 gains a continuation
            for n in range(self.min_n, min(self.max_n, p) + 1):
                idx.latest[n - self.min_n][tuple(toks[p - n : p])] = p - n
            toks.append(t)

    def _lookup(self, idx: _Index, k: int) -> list[int]:
        toks = idx.tokens
        size = len(toks)
        lo = max(0, size - self.window)  # a match must start inside the window
        for n in range(min(self.max_n, size - lo - 1), self.min_n - 1, -1):
            start = idx.latest[n - self.min_n].get(tuple(toks[size - n :]))
            if start is not None and start >= lo:
                return toks[start + n : start + n + k]
        return []

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """The proposal for a bare token sequence (a fresh index over it)."""
        idx = self._new_index()
        self._extend(idx, ids)
        return self._lookup(idx, k)
