"""Continuous batching over the paged KV pool and the prefix cache.

Each step the scheduler builds one batch: every decoding request gets its next row(s),
then prefill work (continuing chunked prefills first, then new arrivals in FIFO order)
fills the remaining token budget. Admission needs free pages (evicting unlocked cache
pages as needed, never retracting running requests to admit new ones). When a decoding
request needs a page and none can be had, the most recently admitted request is retracted:
its computed pages go into the prefix cache (so recompute is cheap if they survive), the
rest are freed, and it waits to be recomputed as prompt + output so far. No step can run
out of KV memory.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from runtime.engine.kv_pool import KVPool
from runtime.engine.page_table import PageList
from runtime.engine.radix_cache import PrefixCache, duplicate_pages
from runtime.engine.request import Phase, Req


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 256  # requests holding KV at once
    max_batch_tokens: int = 4096  # new tokens per forward (the chunked-prefill budget)
    chunked_prefill: bool = True  # off: a prompt is prefilled in one step, whatever its length
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_running and max_batch_tokens must be positive")


@dataclass
class ScheduledSeq:
    req: Req
    start: int  # position of the first new token (= KV tokens already computed)
    q_len: int  # new tokens this step
    num_logits: int  # trailing rows that need logits (0 for a prefill chunk that ends mid-prompt)


@dataclass
class Batch:
    seqs: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.q_len for s in self.seqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: KVPool, cache: PrefixCache) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cache = cache
        self.page_size = pool.page_size
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # holding KV (PREFILL or DECODE), in admission order
        self._order = itertools.count()
        self.num_retractions = 0
        # Requests the scheduler itself ended (the pool could not hold them); the engine
        # reports them after the step.
        self.ended: list[Req] = []
        self.held: list[Req] = []  # finished, KV kept for a transfer (see Req.hold_kv)

    # ---- queue management -------------------------------------------------------------
    def add(self, req: Req) -> None:
        if req.seq_len >= self.cfg.max_model_len:
            raise ValueError(
                f"prompt has {req.seq_len} tokens; the context holds {self.cfg.max_model_len}"
            )
        if self.pool.pages_for(req.seq_len + 1) > self.pool.total_pages:
            raise ValueError(
                f"prompt has {req.seq_len} tokens; the KV pool holds only "
                f"{self.pool.total_pages * self.page_size}"
            )
        self.waiting.append(req)

    def finish(self, req: Req, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request (stop, length, abort): its pages go to the cache or the free list."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
            if req.hold_kv and reason != "abort":
                # Full pages go to the prefix cache now (locked by req); the pages stay
                # req's until `release_held`.
                self._cache_prefix(req)
                self.held.append(req)
            else:
                self._release(req, cache=True)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.phase = Phase.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason

    def release_held(self, req: Req) -> None:
        """A held request's KV was sent (or the transfer failed): release its pages."""
        self.held.remove(req)
        self._release(req, cache=False)

    def alloc_pages(self, n: int) -> list[int] | None:
        """Pages for KV that arrives from elsewhere (a decode worker's incoming transfers);
        None when even after evicting the cache there is no room."""
        if self.pool.num_free < n:
            self.cache.evict(n - self.pool.num_free)
        return self.pool.alloc(n) if self.pool.num_free >= n else None

    def add_prefilled(self, req: Req, pages: list[int]) -> None:
        """Admit a request whose prompt KV already sits in `pages` (written by a prefill
        worker) and whose first output token is in req.output_ids: it starts decoding."""
        m = self.cache.match([])  # the root: nothing shared, but lock/unlock stay balanced
        self.cache.lock(m.node)
        req.cache_node = m.node
        req.pages = PageList(pages)
        req.num_computed = len(req.prompt_ids)
        req.num_cache_owned = 0
        req.admitted_once = True
        req.phase = Phase.DECODE
        req.arrival = next(self._order)
        self.running.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, decode_tokens: dict[str, int] | None = None) -> Batch:
        """Pick this step's work. `decode_tokens` maps rid -> rows for a decoding request
        (1 by default; k+1 when verifying k draft tokens)."""
        decode_tokens = decode_tokens or {}
        seqs: list[ScheduledSeq] = []
        for req in [r for r in self.running if r.phase is Phase.DECODE]:
            if req.phase is not Phase.DECODE:  # retracted earlier in this loop
                continue
            n = decode_tokens.get(req.rid, 1)
            # n rows: the last sampled token plus n-1 draft tokens, at positions seq_len-1...
            if not self._reserve(req, req.seq_len - 1 + n, retract=True):
                continue
            seqs.append(ScheduledSeq(req, start=req.num_computed, q_len=n, num_logits=n))
        budget = self.cfg.max_batch_tokens - sum(s.q_len for s in seqs)
        seqs += self._schedule_prefill(budget, batch_empty=not seqs)
        return Batch(seqs)

    def _schedule_prefill(self, budget: int, batch_empty: bool) -> list[ScheduledSeq]:
        out: list[ScheduledSeq] = []
        candidates = [r for r in self.running if r.phase is Phase.PREFILL] + list(self.waiting)
        for req in candidates:
            if budget <= 0:
                break
            if req.phase is Phase.WAITING:
                if len(self.running) >= self.cfg.max_running:
                    break
                self._match_prefix(req)
            remaining = req.seq_len - req.num_computed
            if req.grammar is not None and not req.grammar.ready:
                # Its last token's logits need the compiled grammar: prefill the rest meanwhile.
                remaining -= 1
                if remaining <= 0:
                    self._undo_admission(req)
                    continue
            if remaining > budget and not (self.cfg.chunked_prefill or (batch_empty and not out)):
                self._undo_admission(req)
                break
            chunk = min(remaining, budget) if self.cfg.chunked_prefill else remaining
            # A chunked prefill already running may retract newer requests only when nothing
            # else is scheduled, so a pool full of half-prefilled prompts still makes progress.
            may_retract = req.phase is Phase.PREFILL and batch_empty and not out
            if not self._reserve(req, req.num_computed + chunk, retract=may_retract):
                self._undo_admission(req)
                break
            if req.phase is Phase.WAITING:
                self.waiting.remove(req)
                self.running.append(req)
                req.phase = Phase.PREFILL
                req.arrival = next(self._order)
            done = req.num_computed + chunk == req.seq_len
            out.append(ScheduledSeq(req, start=req.num_computed, q_len=chunk, num_logits=1 if done else 0))
            budget -= chunk
        return out

    def _match_prefix(self, req: Req) -> None:
        # Keep at least one token to compute: its logits give the next token. A request that
        # asks for prompt logprobs from position p computes the logits of positions p-1 on.
        limit = req.seq_len - 1
        if req.params.prompt_logprobs_start is not None:
            limit = min(limit, req.params.prompt_logprobs_start - 1)
        m = self.cache.match(req.all_ids[:limit])
        self.cache.lock(m.node)
        req.cache_node = m.node
        req.pages = PageList(m.pages)
        req.num_computed = req.num_cache_owned = m.num_tokens
        if not req.admitted_once:
            req.cached_tokens = min(m.num_tokens, len(req.prompt_ids))
            req.admitted_once = True

    def _undo_admission(self, req: Req) -> None:
        if req.phase is Phase.WAITING:
            self._release(req, cache=False)

    # ---- after the forward ---------------------------------------------------------------
    def advance(self, seq: ScheduledSeq, num_computed: int) -> None:
        """Record that KV now holds `num_computed` tokens of seq.req (after the forward and,
        for decode, after the accepted tokens were appended)."""
        req = seq.req
        req.num_computed = num_computed
        if req.phase is Phase.PREFILL and seq.num_logits:
            req.phase = Phase.DECODE
            self._cache_prefix(req)
        self._trim_pages(req)

    # ---- pages ---------------------------------------------------------------------------
    def _reserve(self, req: Req, tokens: int, retract: bool) -> bool:
        """Make req hold pages for `tokens` positions, evicting unlocked cache pages and, if
        allowed, retracting requests admitted after it (the newest first). False when it
        cannot: req is then left as it was, or retracted itself if it is the newest."""
        need = self.pool.pages_for(tokens) - len(req.pages)
        while need > 0:
            if self.pool.num_free < need:
                self.cache.evict(need - self.pool.num_free)
            if self.pool.grow_to(req.pages, tokens):
                return True
            if not retract:
                return False
            # Only newer requests are retracted: older ones may already be in this batch.
            victim = max(self.running, key=lambda r: r.arrival)
            if victim is req:
                if len(self.running) == 1:
                    # Alone and still no room: the pool cannot hold this sequence any longer.
                    self.finish(req, "length")
                    self.ended.append(req)
                else:
                    self._retract(req)
                return False
            self._retract(victim)
        return True

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self._release(req, cache=True)
        req.phase = Phase.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    def _trim_pages(self, req: Req) -> None:
        """Free pages past what the KV needs (rolled-back draft tokens)."""
        self.pool.shrink_to(req.pages, max(req.num_computed, req.num_cache_owned))

    def _cache_prefix(self, req: Req) -> None:
        """Hand the full pages of req's computed KV to the prefix cache."""
        full = req.num_computed // self.page_size
        if full * self.page_size <= req.num_cache_owned:
            return
        n_dup, m = self.cache.insert(req.all_ids[: full * self.page_size], req.pages[:full])
        owned = m.num_tokens // self.page_size
        # Pages the tree already had for these positions replace ours; free our copies.
        self.pool.free(duplicate_pages(req.pages[:full], m))
        req.pages[:owned] = m.pages
        self.cache.lock(m.node)
        self.cache.unlock(req.cache_node)
        req.cache_node = m.node
        req.num_cache_owned = m.num_tokens

    def _release(self, req: Req, cache: bool) -> None:
        if cache:
            self._cache_prefix(req)
        owned = req.num_cache_owned // self.page_size
        if len(req.pages) > owned:
            self.pool.free(req.pages[owned:])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = None
        req.pages = PageList()
        req.num_computed = req.num_cache_owned = 0

    def check_no_leak(self) -> None:
        """With no request running, every page is free or held by the prefix cache."""
        held = sum(len(r.pages) - r.num_cache_owned // self.page_size for r in self.running + self.held)
        self.pool.check_no_leak(held=held + self.cache.cached_pages)
