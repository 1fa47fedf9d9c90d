"""The EAGLE drafter: serves the head of eagle_head.py (whose docstring defines x_p, f_p
and the head), drafting chains or trees.

Context (the serving regime, which train_draft.py trains under): a request's head context
is every pair (x_p, f_{p-1}) for p = 1 .. S, prompt included, with real features: the
prompt pairs arrive through observe_prompt (per prefill chunk), the generated ones through
observe. With a prefix-cache hit the context starts at the first computed prompt position;
a drafter restart (see MAX_PENDING) starts it at the newest token.

Drafting with depth k: step 1 runs the head over the newest pair (x_S, f_{S-1}) (with any
earlier pairs not yet cached: the catch-up), giving f^_S and the root's candidates. Each
further step runs the head over the current frontier: a draft node at depth d is the pair
(its token, its parent's predicted feature) at position S + d, attending the committed
pairs, its ancestors and itself (the per-row tree rule of attention/base.py). Which nodes
are expanded and kept is tree.py's TreeBuilder (EAGLE-2: best cumulative log-probability);
branch 1 is the chain d_j = argmax lm_head(f^_{S+j-1}). Drafts are argmaxes / top-k, so the
drafter is deterministic (q one-hot), which is what EngineCore's acceptance assumes.

The head's KV cache is a 1-layer paged KVPool. Pair i of a request sits in slot i of its
head pages at rope position start + i (start: the position of its first pair). Pairs built
from real features are "committed"; draft nodes are written past them (depth d, frontier
row f at slot committed + (d-1)*branch + f) and simply overwritten by the next catch-up
(their pages are freed after each propose).

Drafts never leave the device before verification reads them (DeviceDrafts). Under greedy
decoding, continue_after_verify queues the next step's drafting behind each verify step
(one graph replay): acceptance, the catch-up of the k+1 verify rows along the accepted run
(for a tree, its path's rows in depth order; rows past the run are junk past the committed
pairs, overwritten before anything attends them) and the next chain or tree.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from runtime.engine.speculative.base import Drafter
from runtime.engine.speculative.eagle_graphs import ContinueGraphs, Grown, GrowGraphs, HeadStep
from runtime.engine.speculative.eagle_head import load_head
from runtime.engine.speculative.tree import TreeBuilder, best_tokens, greedy_path, top_logprobs
from runtime.engine.attention import AttentionMetadata, make_attention_backend
from runtime.engine.draft_tree import DeviceDrafts, PendingDraft
from runtime.engine.h2d import to_device
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext
from runtime.engine.request import Req

if TYPE_CHECKING:
    from runtime.engine.core import EngineCore
    from runtime.engine.cuda_graph import CudaGraphDecoder

log = logging.getLogger("runtime.speculative")

# Generated pairs observed but not yet cached (drafting was off, e.g. a large batch under
# the adaptive policy). Past this the head context restarts instead of growing without
# bound. Prompt pairs are exempt: they are bounded by the prompt, whose target KV is ~2 *
# num_layers times larger than their features.
MAX_PENDING = 256
# A catch-up caches at most this many pairs per request and head forward, and at most
# CATCHUP_ROWS rows per forward: a long prompt is cached in several forwards.
CATCHUP_CHUNK = 512
CATCHUP_ROWS = 4096
# A catch-up of at most this many pairs per request (the steady state: the tokens accepted
# by one verify step) runs in decode shape, one row per pair with its own key count: one
# paged-decode launch, no prefill planning. Longer ones (a prompt) run as a prefill, which
# reads each key once instead of once per row, unless all their rows fit the catch-up CUDA
# graph: a replay costs the host far less than an eager prefill of the head (on CUDA the
# first propose after every prompt, and a probe's catch-up under the adaptive policy).
DECODE_CATCHUP = 8


@dataclass
class _State:
    """One request's head context. Pair i (slot i of `pages`) is at position start + i."""

    start: int
    pages: list[int] = field(default_factory=list)
    committed: int = 0  # pairs whose KV (from real features) is in the head cache
    tokens: list[int] = field(default_factory=list)  # pairs observed, not yet cached
    feats: list[torch.Tensor] = field(default_factory=list)  # their features, chunks [n, H]
    prompt_pending: int = 0  # how many pending pairs are exempt from MAX_PENDING (prompt pairs)
    last: tuple[int, torch.Tensor] | None = None  # the newest pair, redone when nothing is pending
    continued: bool = False  # continue_after_verify cached this step's pairs on the device

    @property
    def next_pos(self) -> int:
        return self.start + self.committed + len(self.tokens)

    def add(self, tokens: list[int], feats: torch.Tensor) -> None:
        rows = feats.detach().clone()  # CUDA-graph decode returns views of static buffers
        self.tokens += tokens
        self.feats.append(rows)
        self.last = (tokens[-1], rows[-1:])


class EagleDrafter(Drafter):
    name = "eagle"
    wants_prompt_hidden = True

    def __init__(self, core: "EngineCore") -> None:
        loaded = core.loaded
        self.target = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.head = load_head(core.cfg.draft_model, core.model_config, self.device, self.dtype)
        self.vocab = self.head.vocab(self.target.lm_head.weight)  # what drafts are scored over
        # Serve with one q|k|v and one gate|up GEMM, like the target (and its fused kernels).
        self.head.layer.self_attn.fuse()
        self.head.layer.mlp.fuse()
        if self.device.type == "cuda":  # draft nodes sit up to k positions past the sequence
            self.head.rotary.prepare_table(core.max_model_len + core.cfg.num_draft_tokens + 1, self.dtype)
        trained_for = self.head.meta.get("target_model")
        if trained_for and trained_for != loaded.name:
            log.warning("EAGLE head %s was trained for %s, serving %s: drafts may be poor (outputs stay exact)",
                        core.cfg.draft_model, trained_for, loaded.name)
        # (branch, max nodes); branch 1 drafts chains.
        self.branch, self.max_nodes = core.cfg.draft_tree or (1, 0)
        hc = self.head.cfg
        ps = core.cfg.page_size
        self.pool = KVPool(1, self._num_pages(core), ps, hc.num_kv_heads, hc.head_dim, self.dtype, self.device)
        # Draft steps are decode-shape rows (with a tree rule for trees): Triton's paged
        # decode kernel runs them in one launch, where flashinfer would plan a masked prefill
        # every step. Otherwise the target's backend.
        backend = "triton" if core.attn.name == "flashinfer" else core.attn.name
        self.attn = make_attention_backend(backend, self.device, num_q_heads=hc.num_heads,
                                           num_kv_heads=hc.num_kv_heads, head_dim=hc.head_dim, dtype=self.dtype)
        self.states: dict[str, _State] = {}
        # Drafts queued by continue_after_verify: (request ids, k, drafts).
        self._next: tuple[list[str], int, DeviceDrafts] | None = None
        self.graphs: GrowGraphs | None = None
        self.continued: ContinueGraphs | None = None  # continue_after_verify, replayed
        self.catchup: CudaGraphDecoder | None = None  # steady-state catch-ups, replayed
        if core.runner.graphs is not None and self.attn.name == "triton":
            from runtime.engine.cuda_graph import CudaGraphDecoder

            max_batch = min(core.cfg.max_running, core.cfg.speculative_max_batch, 64)
            self.graphs = GrowGraphs(self, core.cfg.num_draft_tokens, core.max_model_len, max_batch)
            try:
                self.continued = ContinueGraphs(self, core.cfg.num_draft_tokens, core.max_model_len, max_batch)
            except RuntimeError as e:  # still exact without it: continue_after_verify runs eagerly
                log.warning("EAGLE continued-drafting graphs not captured (%s); continuing eagerly", e)
            rows = max_batch * DECODE_CATCHUP
            self.catchup_model = HeadStep(self.head, self.target, rows)
            self.catchup = CudaGraphDecoder(self.catchup_model, self.pool, rows, core.max_model_len)

    def _num_pages(self, core: "EngineCore") -> int:
        # As many tokens as the target pool: a request's head context is never longer than
        # its sequence. One layer instead of num_layers, so ~1/num_layers of its memory;
        # on CUDA also at most a quarter of what is free after the target's pool.
        ps = core.cfg.page_size
        hc = self.head.cfg
        tokens = core.pool.total_pages * ps
        if self.device.type == "cuda":
            per_token = KVPool.bytes_per_page(1, 1, hc.num_kv_heads, hc.head_dim, self.dtype)
            free, _ = torch.cuda.mem_get_info(self.device)
            tokens = min(tokens, free // 4 // per_token)
        return max(2, -(-tokens // ps) + 1)

    # ---- the Drafter seam -------------------------------------------------------------------
    def observe_prompt(self, req: Req, start: int, hidden: torch.Tensor) -> None:
        # hidden[i] is f_{start+i}; the chunk completes the pairs (x_p, f_{p-1}) for
        # p = start+1 .. start+q_len whose token is already known (p < seq_len). The pair of
        # the first generated token comes with observe().
        first = start + 1
        last = min(start + hidden.shape[0], req.seq_len - 1)
        if last < first:
            return
        st = self.states.get(req.rid)
        if st is not None and st.next_pos != first:
            self._drop(req.rid)  # out of step: restart the head context here
            st = None
        if st is None:
            st = self.states[req.rid] = _State(start=first)
        ids = req.all_ids[first : last + 1]
        st.add(ids, hidden[: len(ids)])
        st.prompt_pending = len(st.tokens)

    def observe(self, req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        # Called before the tokens are appended: accepted[j] lands at position seq_len + j
        # and hidden[j] is f at the position before it, so (accepted[j], hidden[j]) is a pair.
        if hidden is None or not accepted:
            return
        if hidden.shape[0] != len(accepted):
            raise ValueError(f"observe: {len(accepted)} tokens but {hidden.shape[0]} hidden rows")
        pos = req.seq_len
        st = self.states.get(req.rid)
        if st is not None and st.continued:
            # continue_after_verify cached these pairs (the same exact-match acceptance on
            # the device) and drafted from the last one.
            st.continued = False
            if st.next_pos == pos and not st.tokens:
                st.committed += len(accepted)
                st.last = (accepted[-1], hidden[-1:].clone())
                return
        if st is not None and (st.next_pos != pos
                               or len(st.tokens) - st.prompt_pending + len(accepted) > MAX_PENDING):
            self._drop(req.rid)  # out of step (or too far behind): restart the head context here
            st = None
        if st is None:
            st = self.states[req.rid] = _State(start=pos)
        st.add(list(accepted), hidden)

    def release(self, req: Req) -> None:
        self._drop(req.rid)

    @torch.inference_mode()
    def propose(self, reqs: list[Req], k: int) -> dict[str, PendingDraft]:
        ready = self._take_continued(reqs, k)
        if ready is not None:
            return ready
        tree_slots = (k - 1) * self.branch  # draft nodes written to the head cache
        batch: list[tuple[Req, _State]] = []
        for r in reqs:
            st = self.states.get(r.rid)
            if st is None:
                continue
            if st.next_pos != r.seq_len:
                self._drop(r.rid)
                continue
            if not st.tokens:
                # Nothing new since the last propose (the verify step did not run for this
                # request): redo the newest pair, whose output is the tree's root.
                if st.committed == 0 or st.last is None:
                    continue
                st.committed -= 1
                st.tokens, st.feats, st.prompt_pending = [st.last[0]], [st.last[1]], 0
            if not self.pool.grow_to(st.pages, st.committed + len(st.tokens) + tree_slots):
                self._drop(r.rid)
                continue
            batch.append((r, st))
        if not batch:
            return {}
        states = [st for _, st in batch]
        while True:  # long backlogs (a whole prompt): cache all but the last chunk first
            backlog = [st for st in states if len(st.tokens) > CATCHUP_CHUNK]
            if not backlog:
                break
            group = backlog[: max(1, CATCHUP_ROWS // CATCHUP_CHUNK)]
            self._cache_pairs(group, [CATCHUP_CHUNK] * len(group))
        root = self._cache_pairs(states, [len(st.tokens) for st in states])  # [B, H]: f^_S
        tokens, parents, depths, bits = self._grow(states, root, k)
        for st in states:
            self.pool.shrink_to(st.pages, st.committed)  # free the pages of draft nodes only
        # No host sync: the verify step is built and queued from the device drafts, and
        # reads them with its own result.
        drafts = DeviceDrafts(tokens, parents, depths, bits, max_depth=k)
        return {r.rid: view for (r, _), view in zip(batch, drafts.views())}

    @torch.inference_mode()
    def continue_after_verify(self, reqs: list[Req], drafts: DeviceDrafts, best: torch.Tensor,
                              hidden: torch.Tensor) -> bool:
        """Queue the next step's drafting right behind a greedy verify step, before the host
        has read its result, so the host's bookkeeping of this step overlaps the drafting of
        the next. Only where request i verified all nodes of row i of `drafts` (its chain or
        tree, n nodes): best int64 [B*(n+1)] is the target's argmax per verify row, hidden
        [B*(n+1), H] its features. On the device: find what EngineCore._accept will find
        (the run of drafts that match the argmax of their parent's row, plus the bonus
        token), cache the pairs (argmax, feature) of the k+1 verify rows along it (for a
        tree, the accepted path's rows, gathered in depth order; rows past the accepted run
        sit past the committed pairs and are overwritten before they are ever attended), and
        grow from the last accepted one. observe() then only advances the committed count;
        propose() hands out the drafts if the next step decodes the same requests with the
        same k."""
        self._next = None
        k = drafts.max_depth
        if (drafts.parents is None) != (self.branch == 1):
            return False
        states = []
        for r in reqs:
            st = self.states.get(r.rid)
            if st is None or st.tokens or st.next_pos != r.seq_len or st.committed == 0:
                return False
            states.append(st)
        # The k+1 rows, then the next drafts.
        need = [st.committed + (k + 1) + (k - 1) * self.branch for st in states]
        if not all(self.pool.grow_to(st.pages, n) for st, n in zip(states, need)):
            return False
        grown = None
        if self.continued is not None:
            grown = self.continued.run(states, drafts, best, hidden)
        if grown is None:
            grown = self._continue_device(drafts.tokens, drafts.parents, drafts.depths, drafts.bits, best, hidden,
                                          *self._state_tensors(states), k, self.attn, self.attn,
                                          [st.committed + 2 * k + (k - 1) * self.branch for st in states])
        for st in states:
            st.continued = True
        self._next = ([r.rid for r in reqs], k, DeviceDrafts(*grown, max_depth=k))
        return True

    def _continue_device(
        self, drafts: torch.Tensor, parents: torch.Tensor | None, depths: torch.Tensor | None,
        bits: torch.Tensor | None, best: torch.Tensor, hidden: torch.Tensor, committed: torch.Tensor,
        start: torch.Tensor, table: torch.Tensor, k: int, catchup_attn: Any, grow_attn: Any, kv_hint: list[int],
    ) -> Grown:
        """continue_after_verify's device work, on device tensors only, so it can be
        captured: drafts int64 [B, n] (and for trees parents, depths, bits int64 [B, n], as
        DeviceDrafts'), best int64 [B*(n+1)], hidden [B*(n+1), H], committed, start int64
        [B], table int32 [B, W], k the drafts' depth. kv_hint: host key counts per request
        that only size the attention's split count."""
        b, w = drafts.shape
        dev, ps, n, h = self.device, self.pool.page_size, b * (k + 1), hidden.shape[-1]
        am = best.view(b, w + 1)
        if parents is None:  # a chain: rows 0..k in order, the leading matches accepted
            accepted = 1 + (drafts == am[:, :w]).long().cumprod(1).sum(1)  # [B], the bonus included
        else:  # the accepted path's rows in depth order (past it: junk, overwritten later)
            accepted, path = greedy_path(drafts, parents, depths, bits, am, k)
            am = am.gather(1, path)
            hidden = hidden.view(b, w + 1, h).gather(1, path[..., None].expand(b, k + 1, h)).view(n, h)
        pair = committed[:, None] + torch.arange(k + 1, device=dev)[None, :]  # [B, k+1]: slot of each row's pair
        slots = (table.long().gather(1, pair // ps) * ps + pair % ps).view(n)
        meta = AttentionMetadata(
            q_lens=torch.ones(n, dtype=torch.int32, device=dev), kv_lens=(pair + 1).int().view(n),
            cu_q_lens=torch.arange(n + 1, dtype=torch.int32, device=dev),
            page_table=table.repeat_interleave(k + 1, dim=0), q_lens_cpu=[1] * n,
            kv_lens_cpu=[c for c in kv_hint for _ in range(k + 1)], page_size=ps,
        )
        catchup_attn.prepare(meta)
        out = self.head(self.target.model.embed_tokens(am[:, : k + 1].reshape(n)), hidden[:n],
                        (start[:, None] + pair).view(n), ForwardContext(self.pool, catchup_attn, slots))
        root = out.view(b, k + 1, h).gather(1, (accepted - 1)[:, None, None].expand(b, 1, h))[:, 0]
        return self._grow_device(root, committed + accepted, start, table, k, grow_attn, kv_hint)

    def _take_continued(self, reqs: list[Req], k: int) -> dict[str, PendingDraft] | None:
        nxt, self._next = self._next, None
        if nxt is None:
            return None
        rids, nk, drafts = nxt
        states = [self.states.get(rid) for rid in rids]
        if rids != [r.rid for r in reqs] or nk != k or any(
                st is None or st.continued or st.tokens or st.next_pos != r.seq_len for st, r in zip(states, reqs)):
            for st in states:  # observe() did not run for some: nothing was committed
                if st is not None:
                    st.continued = False
            return None
        for st in states:
            self.pool.shrink_to(st.pages, st.committed)  # free the pages of draft nodes only
        return dict(zip(rids, drafts.views()))

    # ---- internals ---------------------------------------------------------------------------
    def _cache_pairs(self, states: list[_State], counts: list[int]) -> torch.Tensor:
        """Run the head over the first counts[i] pending pairs of each state, writing their
        KV (they become committed). Returns the head's output at each state's last one [B, H]."""
        ps, dev = self.pool.page_size, self.device
        tokens: list[int] = []
        feats, positions, slots, kv_lens, pages = [], [], [], [], []
        decode = max(counts) <= DECODE_CATCHUP or (
            self.catchup is not None and self.catchup.can_run(sum(counts), max(len(st.pages) for st in states)))
        for st, n in zip(states, counts):
            pending = torch.cat(st.feats) if len(st.feats) > 1 else st.feats[0]
            feats.append(pending[:n])
            st.feats = [pending[n:]] if n < len(st.tokens) else []
            tokens += st.tokens[:n]
            del st.tokens[:n]
            c = st.committed
            positions += range(st.start + c, st.start + c + n)
            slots += [st.pages[i // ps] * ps + i % ps for i in range(c, c + n)]
            if decode:  # one row per pair, seeing the pairs up to itself
                kv_lens += range(c + 1, c + n + 1)
                pages += [st.pages] * n
            else:
                kv_lens.append(c + n)
            st.committed += n
            st.prompt_pending = max(0, st.prompt_pending - n)
        last = to_device(torch.tensor(counts, dtype=torch.int64).cumsum(0) - 1, torch.int64, dev)  # each state's last row
        if decode:
            return self._run_pairs(tokens, torch.cat(feats), positions, slots, kv_lens, pages)[last]
        meta = AttentionMetadata.build(counts, kv_lens, [st.pages for st in states], ps, dev)
        return self._head_forward(meta, tokens, torch.cat(feats), positions, slots)[last]

    def _run_pairs(self, tokens: list[int] | torch.Tensor, feats: torch.Tensor, positions: list[int],
                   slots: list[int], kv_lens: list[int], pages: list[list[int]]) -> torch.Tensor:
        """The head over pairs in decode shape (one row per pair, seeing kv_lens[i] pairs of
        its page list, itself last), replayed from the catch-up graph when they fit: its
        outputs [N, H]. tokens may be an int64 device tensor."""
        n = len(tokens)
        if self.catchup is not None and self.catchup.can_run(n, max(len(p) for p in pages)):
            self.catchup_model.feats[:n].copy_(feats)
            return self.catchup.run(tokens, positions, slots, pages, kv_lens)[0]
        meta = AttentionMetadata.build([1] * n, kv_lens, pages, self.pool.page_size, self.device)
        return self._head_forward(meta, tokens, feats, positions, slots)

    def _head_forward(self, meta: AttentionMetadata, tokens: list[int] | torch.Tensor, feats: torch.Tensor,
                      positions: list[int], slots: list[int]) -> torch.Tensor:
        dev = self.device
        self.attn.prepare(meta)
        ctx = ForwardContext(self.pool, self.attn, to_device(slots, torch.int64, dev))
        ids = tokens if isinstance(tokens, torch.Tensor) else to_device(tokens, torch.int64, dev)
        return self.head(self.target.model.embed_tokens(ids), feats, to_device(positions, torch.int64, dev), ctx)

    def _grow(self, states: list[_State], root: torch.Tensor, k: int) -> Grown:
        """Draft steps 2..k over the tree's frontier, all on the device (replayed from a
        CUDA graph when one fits)."""
        if self.graphs is not None:
            out = self.graphs.run(states, root, k)
            if out is not None:
                return out
        committed, start, table = self._state_tensors(states)
        kv_hint = [st.committed + (k - 1) * self.branch for st in states]
        return self._grow_device(root, committed, start, table, k, self.attn, kv_hint)

    def _state_tensors(self, states: list[_State]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The states' committed counts, starts (int64 [B]) and page tables (int32 [B, W]) on the device."""
        dev = self.device
        width = max(len(st.pages) for st in states)
        table = to_device([st.pages + [0] * (width - len(st.pages)) for st in states], torch.int32, dev)
        return (to_device([st.committed for st in states], torch.int64, dev),
                to_device([st.start for st in states], torch.int64, dev), table)

    def _grow_device(
        self, root: torch.Tensor, committed: torch.Tensor, start: torch.Tensor, table: torch.Tensor, k: int,
        attn: Any, kv_hint: list[int],
    ) -> Grown:
        """_grow's body on device tensors only (root [B, H]; committed, start int64 [B];
        table int32 [B, W]), so it can be captured. kv_hint: host key counts per request,
        which only size the attention's split count."""
        w = self.vocab
        b, kb, h = root.shape[0], self.branch, root.shape[-1]
        chain = kb == 1
        if chain:  # the argmax at every depth: no log-probabilities, no tree bookkeeping
            drafted = [best_tokens(root, w)]
            front_tokens = drafted[0][:, None]
        else:
            tree = TreeBuilder(kb, k)
            front = tree.start(*top_logprobs(root, w, kb))
            front_tokens = front.tokens
        if k > 1:
            dev, ps, n = self.device, self.pool.page_size, b * kb
            # Per-propose constants, one row per frontier node (request-major).
            c_rows = committed.repeat_interleave(kb)  # [n]
            root_pos = (start + committed - 1).repeat_interleave(kb)
            node = torch.arange(kb, device=dev).repeat(b)  # frontier row of each row
            table = table.repeat_interleave(kb, dim=0)  # int32 [n, W]
            ones, cu = torch.ones(n, dtype=torch.int32, device=dev), torch.arange(n + 1, dtype=torch.int32, device=dev)
            kv_host = [c for c in kv_hint for _ in range(kb)]
            # Every step's row inputs at once, [k-1, n]: the depth-d frontier (d = 1..k-1)
            # writes tree slot (d-1)*kb + node, at position root + d, seeing d*kb tree slots.
            depth = torch.arange(1, k, device=dev)[:, None]
            own = (depth - 1) * kb + node  # tree slot
            slot = c_rows + own
            out_slots = table.long().gather(1, (slot // ps).T).T * ps + slot % ps
            kv_lens = (c_rows + depth * kb).int()
            positions = root_pos + depth
            one_hot = torch.ones_like(own) << own  # each row's own bit
            tree_start = None if chain else c_rows.int()  # a chain sees all its earlier slots: no tree rule
            feats = root[:, None, :]  # [B, 1, H]: the root's output is every depth-1 node's feature
            bits = torch.zeros(b, 1, dtype=torch.int64, device=dev)
            for d in range(1, k):  # run the depth-d frontier, giving depth d+1's candidates
                if not chain:
                    bits = bits.gather(1, front.parent) | one_hot[d - 1].view(b, kb)
                meta = AttentionMetadata(
                    q_lens=ones, kv_lens=kv_lens[d - 1], cu_q_lens=cu, page_table=table,
                    q_lens_cpu=[1] * n, kv_lens_cpu=kv_host, page_size=ps,
                    tree_start=tree_start, tree_bits=None if chain else bits.view(n),
                )
                attn.prepare(meta)
                feat_in = feats.view(n, h) if chain else feats.gather(1, front.parent[..., None].expand(b, kb, h)).view(n, h)
                out = self.head(self.target.model.embed_tokens(front_tokens.reshape(n)), feat_in, positions[d - 1],
                                ForwardContext(self.pool, attn, out_slots[d - 1]))
                feats = out.view(b, kb, h)
                if chain:
                    drafted.append(best_tokens(out, w))
                    front_tokens = drafted[-1]
                else:
                    front = tree.grow(*top_logprobs(feats, w, kb))
                    front_tokens = front.tokens
        if chain:
            return Grown(torch.stack(drafted, 1), None, None, None)
        return Grown(*tree.select(self.max_nodes))

    def _drop(self, rid: str) -> None:
        st = self.states.pop(rid, None)
        if st is not None and st.pages:
            self.pool.free(st.pages)
