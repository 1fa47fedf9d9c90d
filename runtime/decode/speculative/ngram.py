"""Prompt-lookup (n-gram) drafting: find the latest earlier occurrence of the sequence's
last n tokens (n from max_n down to min_n) and propose the tokens that followed it."""
from __future__ import annotations

from runtime.decode.speculative.base import Drafter
from runtime.engine.request import Req


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096) -> None:
        self.max_n, self.min_n, self.window = max_n, min_n, window

    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for req in reqs:
            d = self.lookup(req.all_ids[-self.window :], k)
            if d:
                out[req.rid] = d
        return out

    def lookup(self, ids: list[int], k: int) -> list[int]:
        n_ids = len(ids)
        for n in range(min(self.max_n, n_ids - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            # The most recent earlier match continues the current text best.
            for start in range(n_ids - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    cont = ids[start + n : start + n + k]
                    if cont:
                        return cont
        return []
