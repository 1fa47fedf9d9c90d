"""The speculative half of EngineCore.step: proposing drafts (under the policy, within the
decode graphs), reading drafts still on the device, acceptance (exact under greedy, the
target distribution under sampling) and the KV compaction of accepted tree paths. A mixin:
its methods read EngineCore's state."""
from __future__ import annotations

import logging
from functools import partial

import torch

from runtime.common.logprobs import TokenLogprob
from runtime.engine.alloc_failure import alloc_failure_detail, is_alloc_failure
from runtime.engine.draft_tree import DraftTree, PendingDraft
from runtime.engine.h2d import to_device
from runtime.engine.request import Phase, Req
from runtime.engine.sampler import plain_greedy, uniform_noise

log = logging.getLogger("runtime.engine")

Drafts = dict[str, list[int] | DraftTree | PendingDraft]


def cap_verify_rows(drafts: Drafts, num_reqs: int, max_rows: int) -> Drafts:
    """Drafts cut so that one verify step of num_reqs decoding requests (each one row plus
    its drafts) has at most max_rows rows when it can: every request keeps the same number
    of draft tokens, at least one. Trees keep their first nodes (parents come first,
    siblings best first), chains their first tokens."""
    rows = num_reqs + sum(len(d) for d in drafts.values())
    if rows <= max_rows:
        return drafts
    per_req = max(1, max_rows // max(num_reqs, 1) - 1)
    return {rid: d[:per_req] if isinstance(d, list) else d.truncated(per_req) for rid, d in drafts.items()}


class SpeculativeSteps:
    def _propose_or_skip(self) -> tuple[Drafts, int | None]:
        """`_propose`, or no drafts when drafting runs out of memory: the step then verifies
        nothing (it loses speed, no request fails). Every decoding request's drafter state is
        dropped, as the failure may have left it half updated; drafters start over from the
        requests' tokens."""
        try:
            return self._propose()
        except Exception as e:
            if not is_alloc_failure(e):
                raise
            log.warning("drafting ran out of memory on %s (%s); this step verifies no drafts",
                        self.device, alloc_failure_detail(e))
        for r in self.scheduler.running:
            if r.phase is Phase.DECODE:
                self.drafter.release(r)
        self._empty_device_cache()
        return {}, None

    def _count_accepted(self, req, n: int, drafted: int | None, forced: bool) -> None:
        """A decode step gave `req` n tokens: its step count, the accept-length samples (not
        for a forced jump-forward run), and its own drafting record, which the policy weighs."""
        req.num_steps += 1
        if self.drafter is not None and not forced:
            self.accept_samples.append(n)
            if drafted:
                req.draft_steps += 1
                req.draft_tokens += n

    def _compact_tree_kv(self, seqs: list, trees: dict[str, DraftTree], accepted: dict) -> None:
        """Move the KV of accepted tree nodes to consecutive positions: node i was written
        at slot position start+1+i; the j-th accepted node belongs at start+j."""
        src, dst = [], []
        ps = self.pool.page_size
        for s in seqs:
            if s.req.rid not in trees:
                continue
            pages = s.req.pages
            for j, r in enumerate(accepted[s.req.rid][2][1:], start=1):
                if r != j:  # row r is node r-1, at slot position start + r
                    a, b = s.start + r, s.start + j
                    src.append(pages[a // ps] * ps + a % ps)
                    dst.append(pages[b // ps] * ps + b % ps)
        if src:
            self.pool.copy_slots(src, dst)

    def _finish_figures(self, reqs: list[Req]) -> list[tuple[int, int, int]]:
        """policy.finish_gain's per-request figures: tokens left, drafting steps, tokens gained."""
        return [(min(r.params.max_tokens - len(r.output_ids), self.max_model_len - r.seq_len), r.draft_steps,
                 r.draft_tokens) for r in reqs]

    def _propose(self) -> tuple[Drafts, int]:
        """Drafts for this step's decoding requests, and the policy's k (0: no drafting)."""
        # Drafts of constrained requests are cut to what the grammar allows (constrained_trees);
        # a request with jump-forward tokens pending verifies those instead.
        reqs = [r for r in self.scheduler.running
                if r.phase is Phase.DECODE and (r.grammar is None or not r.grammar.pending_jump(len(r.output_ids)))]
        finish = None
        if self.policy.mode == "adaptive" and reqs and not self.scheduler.waiting:
            # Nothing waits to take a finished request's place: drafting must finish the batch
            # sooner. Listed only when the policy weighs it (~75 us of Python at batch 256).
            finish = partial(self._finish_figures, reqs)
        k = self.policy.num_draft_tokens(len(reqs), finish)
        if not k or not reqs:
            return {}, 0
        drafts = self.drafter.propose(reqs, k)
        for r in reqs:
            d = drafts.get(r.rid)
            if d:
                # Never verify past max_tokens or the context: those rows would be wasted.
                room = max(0, min(k, r.params.max_tokens - len(r.output_ids) - 1, self.max_model_len - r.seq_len - 1))
                drafts[r.rid] = d[:room] if isinstance(d, list) else d.within_depth(room)
        graphs = self.runner.graphs
        if graphs is not None:
            # Keep the verify step inside the captured graphs, under either policy: an eager
            # step of many rows costs more than the extra draft nodes can gain (on the H200,
            # 16 trees of 48 nodes took 18.9 ms of wall time eagerly for 3.8 ms of GPU work).
            drafts = cap_verify_rows(drafts, len(reqs), graphs.max_batch)
        return drafts, k

    def _read_drafts(self, seqs: list, trees: dict[str, DraftTree | PendingDraft], logits: torch.Tensor,
                     hidden: torch.Tensor, greedy: bool) -> list[int] | None:
        """Read drafts still on the device (a drafter that proposes without a host sync)
        and, under greedy, the verify rows' argmax: one host sync for both. Before it, a
        drafter may queue the next step's drafting (continue_after_verify)."""
        pending = {id(t.drafts): t.drafts for t in trees.values() if isinstance(t, PendingDraft)}
        if len(pending) > 1:
            raise ValueError("drafts of more than one propose in one step")
        best = logits.argmax(dim=-1) if greedy else None
        if not pending:
            return best.tolist() if best is not None else None
        drafts = next(iter(pending.values()))
        drafts.start_read(best)
        width = drafts.tokens.shape[1]
        if greedy and len(trees) == len(seqs) and all(
                isinstance(t, PendingDraft) and t.drafts is drafts and t.row == i and len(t) == width
                for i, t in enumerate(trees.get(s.req.rid) for s in seqs)):
            self.drafter.continue_after_verify([s.req for s in seqs], drafts, best, hidden)
        return drafts.fetch()

    def _accept(self, seqs: list, trees: dict[str, DraftTree | PendingDraft], logits: torch.Tensor,
                hidden: torch.Tensor, forced: set[str] = frozenset()
                ) -> dict[str, tuple[list[int], list[TokenLogprob], list[int]]]:
        """Speculative acceptance. A sequence with a draft tree has rows [root, node 0, ...];
        from the root, the children of the current row are tried in order: child c is
        accepted with probability p'(c), where p' is the row's target distribution with the
        children already rejected removed and renormalised (1 or 0 under greedy); an
        accepted child's row is tried next; when every child is rejected, the row samples
        from p' (its bonus token). For deterministic drafts (q one-hot per child) this is
        rejection sampling with min(1, p/q) and residual max(0, p - q) applied child by
        child, so the output keeps the target's distribution exactly; under greedy it is
        exact match plus the target's own token. Returns rid -> (tokens, logprobs, the
        rows, relative to the sequence's first row, that produced the tokens). A request in
        `forced` accepts its chain whole and samples the token after it."""
        greedy = all(plain_greedy(s.req.params) for s in seqs)
        best = self._read_drafts(seqs, trees, logits, hidden, greedy)
        trees = {rid: t.resolve() if isinstance(t, PendingDraft) else t for rid, t in trees.items()}
        kids: list[list[int]] = []  # per row: child rows, in order
        reqs, steps = [], []
        for s in seqs:
            t = trees.get(s.req.rid)
            depths = [0] + (t.depths() if t else [])
            first = len(kids)
            kids += [[] for _ in range(s.num_logits)]
            for i, p in enumerate(t.parents if t else []):
                kids[first + p + 1].append(i + 1)
            for j in range(s.num_logits):
                reqs.append(s.req)
                steps.append(len(s.req.output_ids) + depths[j])
        width = max(1, max(len(c) for c in kids))
        row_tokens: list[list[int]] = []  # per row: its children's tokens
        row0 = 0
        for s in seqs:
            t = trees.get(s.req.rid)
            for j in range(s.num_logits):
                row_tokens.append([t.tokens[c - 1] for c in kids[row0 + j]])
            row0 += s.num_logits
        if not greedy:
            sb = self._sampling_batch(reqs, steps)
            probs = self.sampler.probs(logits, sb)  # [N, V]
            child = to_device([c + [-1] * (width - len(c)) for c in row_tokens], torch.int64, logits.device)
            valid = child >= 0
            p_child = probs.gather(1, child.clamp(min=0)) * valid  # [N, width]
            u = uniform_noise(sb.seed, sb.step, width, stream=1)  # [N, width]
            # The bonus token of a row where every child was rejected: p without its children.
            residual = probs.clone()
            rows_idx, cols_idx = valid.nonzero(as_tuple=True)
            residual[rows_idx, child[rows_idx, cols_idx]] = 0.0
            race = residual / -torch.log(uniform_noise(sb.seed, sb.step, probs.shape[1], stream=0))
            alt = race.argmax(dim=1).tolist()
            pc, uu = p_child.tolist(), u.tolist()
        raw_lp = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        result: dict[str, tuple[list[int], list[TokenLogprob], list[int]]] = {}
        row0 = 0
        for s in seqs:
            r, path, tokens = 0, [0], []
            while True:
                nxt = None
                if s.req.rid in forced:
                    nxt = kids[row0 + r][0] if kids[row0 + r] else None
                elif greedy:
                    for c, tok in zip(kids[row0 + r], row_tokens[row0 + r]):
                        if tok == best[row0 + r]:
                            nxt = c
                            break
                else:
                    removed = 0.0
                    for ci, c in enumerate(kids[row0 + r]):
                        q = pc[row0 + r][ci]
                        if uu[row0 + r][ci] * max(1.0 - removed, 0.0) < q:
                            nxt = c
                            break
                        removed += q
                if nxt is None:
                    tokens.append(best[row0 + r] if greedy else alt[row0 + r])
                    break
                tokens.append(row_tokens[row0 + r][kids[row0 + r].index(nxt)])
                r = nxt
                path.append(r)
            lps: list[TokenLogprob] = []
            if raw_lp is not None and s.req.params.logprobs is not None:
                k = s.req.params.logprobs
                for j, t in zip(path, tokens):
                    lp_row = raw_lp[row0 + j]
                    top = torch.topk(lp_row, k) if k else None
                    lps.append(TokenLogprob(t, lp_row[t].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
            result[s.req.rid] = (tokens, lps, path)
            row0 += s.num_logits
        return result
