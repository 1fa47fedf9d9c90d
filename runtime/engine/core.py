"""EngineCore: one model, one KV pool, one prefix cache, one scheduler; `step()` runs one
forward over the scheduled batch and returns what each request gained. Shared by the
offline `Engine`, the prefill worker and the decode worker."""
from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from runtime.common.logprobs import TokenLogprob
from runtime.common.sampling_params import SamplingParams
from runtime.config import EngineConfig
from runtime.engine.alloc_failure import alloc_failure_detail, is_alloc_failure, maybe_inject_alloc_failure, step_victims
from runtime.engine.attention import make_attention_backend
from runtime.engine.draft_tree import DraftTree, PendingDraft
from runtime.engine.grammar import (GrammarCompiler, GrammarError, compile_failures, constrained_trees, plan_jump,
                                    wait_compiles)
from runtime.engine.h2d import to_device
from runtime.engine.jump_forward import MAX_JUMP_TOKENS, JumpForward
from runtime.engine.kv_pool import KVPool
from runtime.engine.memory_plan import MemoryPlan, plan_kv_pages
from runtime.engine.overlap import OverlapSteps
from runtime.engine.prompt_logprobs import record_prompt_logprobs, wants_prompt_logprobs
from runtime.engine.radix_cache import NoPrefixCache, RadixCache
from runtime.engine.request import Phase, Req
from runtime.engine.runner import ModelRunner
from runtime.engine.sampler import Sampler, SamplingBatch, plain_greedy
from runtime.engine.scheduler import Batch, ScheduledSeq, Scheduler, SchedulerConfig
from runtime.engine.speculative import Drafter, SpeculationPolicy, make_drafter
from runtime.engine.verify import Drafts, SpeculativeSteps
from runtime.engine.weights import LoadedModel, load_model

log = logging.getLogger("runtime.engine")

CPU_KV_TOKENS = 32768


@dataclass
class StepOutput:
    req: Req
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    # Set when the request failed in this step (its step ran out of memory): what the client
    # is told. The request is then finished with finish_reason "error" and holds no KV.
    error: str | None = None
    code: int = 503  # the HTTP status of `error`: 503 out of memory, 400 a grammar that does not compile

    @property
    def finished(self) -> bool:
        return self.req.finished


ACCEPT_SAMPLES_KEPT = 1 << 16  # the newest accept-length samples kept between two heartbeats


def graph_rows(cfg: EngineConfig) -> int:
    """Rows the decode CUDA graphs cover: the batch, or with speculation the verify rows of
    the batches that draft (each request's last token plus its drafts)."""
    rows = min(cfg.cuda_graph_max_batch or cfg.max_running, cfg.max_running)
    if cfg.speculative != "none":
        per_req = 1 + max(cfg.num_draft_tokens, cfg.draft_tree_nodes)
        rows = max(rows, min(cfg.max_running, cfg.speculative_max_batch) * per_req)
    return min(rows, 512)


class EngineCore(SpeculativeSteps, OverlapSteps):
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self.device = cfg.torch_device
        if self.device.type == "cpu":
            from runtime.engine.cpu import configure_cpu

            configure_cpu()
        self.loaded = loaded or load_model(
            cfg.model, device=self.device, dtype=cfg.dtype, load_format=cfg.load_format,
            quantization=cfg.quantization, int4_group_size=cfg.int4_group_size,
            quant_dense_prefill=cfg.quant_dense_prefill,
        )
        mc = self.loaded.config
        self.loaded.model.fuse_projections()
        self.model_config = mc
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        dtype = next(self.loaded.model.parameters()).dtype
        if self.device.type == "cuda":
            self.loaded.model.model.rotary.prepare_table(self.max_model_len, dtype)
        kv_dtype = cfg.kv_torch_dtype(dtype)
        self.attn = make_attention_backend(
            cfg.attention_backend, self.device, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim, dtype=dtype, kv_dtype=kv_dtype,
        )
        self.memory_plan: MemoryPlan | None = None  # CUDA without kv_cache_tokens: the profiled plan
        num_pages = self._num_pages(kv_dtype)
        self.pool = KVPool(mc.num_layers, num_pages, cfg.page_size, mc.num_kv_heads, mc.head_dim, kv_dtype,
                           self.device)
        self.cache = RadixCache(self.pool, cfg.page_size) if cfg.prefix_cache else NoPrefixCache(cfg.page_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=cfg.max_running,
                max_batch_tokens=cfg.max_batch_tokens,
                chunked_prefill=cfg.chunked_prefill,
                max_model_len=self.max_model_len,
            ),
            self.pool,
            self.cache,
        )
        graphs = None
        if self._use_graphs:
            from runtime.engine.cuda_graph import CudaGraphDecoder

            graphs = CudaGraphDecoder(self.loaded.model, self.pool, graph_rows(cfg), self.max_model_len)
        self.runner = ModelRunner(self.loaded.model, self.pool, self.attn, self.device, graphs)
        self.sampler = Sampler()
        self.eos_ids = set(mc.eos_token_ids)
        tok = self.loaded.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        # Compiled once per distinct grammar; xgrammar allows the stop tokens only where the
        # grammar may end.
        self.grammars = GrammarCompiler(tok, mc.vocab_size, sorted(self.eos_ids), self.device)
        self.jumper = JumpForward(tok) if cfg.jump_forward and tok is not None else None
        self.compiling: list[Req] = []  # constrained requests whose grammar is still compiling
        self.requests: dict[str, Req] = {}
        self.drafter = make_drafter(cfg.speculative, self)
        # Whether the drafter keeps per-step state: the n-gram drafter reads the request's
        # tokens when it proposes, so its observe (the base no-op) is not called per request.
        self._observes = self.drafter is not None and type(self.drafter).observe is not Drafter.observe
        self.policy = SpeculationPolicy(cfg.num_draft_tokens, cfg.speculative_policy, cfg.speculative_max_batch)
        # Tokens gained per decode step and request (the bonus token included), for the
        # accept-length histogram; workers drain it into heartbeats. Bounded: the offline
        # Engine has no reader, and a long run must not grow it without end.
        self.accept_samples: deque[int] = deque(maxlen=ACCEPT_SAMPLES_KEPT)
        self._rng = random.Random(cfg.seed)
        self._arrivals = 0
        self.grammars.warm()  # last: the CUDA graphs (the drafter's too) are captured by now
        log.info(
            "engine ready: %s on %s (%s, quantization %s), %d KV pages x %d tokens, attention=%s%s",
            self.loaded.name, self.device, dtype, self.loaded.model.quantization,
            self.pool.total_pages, cfg.page_size, self.attn.name, ", overlap schedule" if cfg.overlap_schedule else "",
        )

    @property
    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and self.cfg.cuda_graph and self.attn.name != "torch"

    def _num_pages(self, dtype: torch.dtype) -> int:
        cfg, mc = self.cfg, self.model_config
        if cfg.kv_cache_tokens is not None:
            tokens = cfg.kv_cache_tokens
        elif self.device.type == "cuda":
            plan = plan_kv_pages(
                self.loaded.model, self.attn, num_layers=mc.num_layers, page_size=cfg.page_size,
                num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, dtype=dtype, device=self.device,
                max_batch_tokens=cfg.max_batch_tokens, max_running=cfg.max_running,
                graph_rows=graph_rows(cfg) if self._use_graphs else 0, max_model_len=self.max_model_len,
                vocab_size=mc.vocab_size, kv_mem_fraction=cfg.kv_mem_fraction,
            )
            log.info("%s", plan.describe(cfg.page_size))
            self.memory_plan = plan
            return plan.num_pages
        else:
            tokens = CPU_KV_TOKENS
        return -(-tokens // cfg.page_size) + 1  # +1: page 0 is reserved

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> Req:
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        grammar = self.grammars.matcher(params)  # GrammarError (a ValueError) when it does not compile
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Req(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed, arrival=self._arrivals,
                  grammar=grammar)
        self._arrivals += 1
        self.scheduler.add(req)
        self.requests[rid] = req
        if grammar is not None and not grammar.ready:
            self.compiling.append(req)
        return req

    def add_prefilled(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, pages: list[int],
        first_token: int, first_logprob: TokenLogprob | None, cached_tokens: int,
        prompt_hidden: torch.Tensor | None = None, hidden_start: int = 0,
    ) -> StepOutput:
        """Start decoding a request whose prompt KV is already in `pages` (sent by a prefill
        worker, which also sampled the first token). `prompt_hidden` [n, H]: the target's
        final hidden states of prompt positions hidden_start .. L-1, handed to a drafter that
        reads them (as if this engine had prefilled). Returns the first token's output."""
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if prompt_hidden is not None and hidden_start + len(prompt_hidden) != len(prompt_ids):
            raise ValueError(f"{rid}: hidden states for positions {hidden_start}..{hidden_start + len(prompt_hidden) - 1}"
                             f" do not end at the prompt's last position {len(prompt_ids) - 1}")
        grammar = self.grammars.matcher(params)
        # The prefill worker sampled the first token under the same grammar; the matcher
        # starts past it (_append then does not accept it again).
        if grammar is not None and not grammar.accept(first_token):
            raise GrammarError(grammar.param, f"{rid}: the first token {first_token} (from the prefill worker) "
                               f"is not allowed by the request's {grammar.param}")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Req(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed, arrival=self._arrivals,
                  cached_tokens=cached_tokens, grammar=grammar)
        self._arrivals += 1
        self.requests[rid] = req
        self.scheduler.add_prefilled(req, pages)
        if prompt_hidden is not None and len(prompt_hidden) and self.drafter is not None \
                and self.drafter.wants_prompt_hidden:
            self.drafter.observe_prompt(req, hidden_start, prompt_hidden)
            self.drafter.observe(req, [first_token], prompt_hidden[-1:])
        kept, reason, stop_reason = self._append(req, [first_token])
        req.num_computed = len(req.prompt_ids)
        if reason is not None:
            self._finish(req, reason, stop_reason)
        plan_jump(req, self.jumper, self.max_model_len, MAX_JUMP_TOKENS)
        lps = [first_logprob] if first_logprob is not None else []
        req.output_logprobs += lps
        return StepOutput(req, kept, lps)

    def abort(self, rid: str) -> Req | None:
        req = self.requests.get(rid)
        if req is not None:
            self._finish(req, "abort")
        return req

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    # ---- one step ------------------------------------------------------------------------
    num_forwards = 0  # forwards run by step() (what RUNTIME_TEST_FAIL_ALLOC's steps count)
    num_alloc_failures = 0  # steps that ran out of memory and failed requests instead of raising

    def step(self, drafts: Drafts | None = None) -> list[StepOutput]:
        """One forward. `drafts` (rid -> proposed next tokens, a chain or a DraftTree) makes
        a decoding request verify them in this forward (the speculative path); accepted
        tokens are exact.

        A step that fails to allocate memory (`is_alloc_failure`: CUDA out of memory, the
        CPU allocator, no KV page) does not raise: the requests it fails come back as
        StepOutputs with `error` set (finished with finish_reason "error", pages freed), its
        other requests run again next step unchanged, and requests outside the step never
        notice (`_fail_alloc` says which fail). Any other exception propagates.

        With EngineConfig.overlap_schedule, a step that needs nothing from the host between
        steps is launched before the last one is read, and returns that one's outputs
        (overlap.py); a step that does need it first settles the step in flight, then runs
        as before, and returns both steps' outputs in order. (`drafts` given by a caller
        were proposed from what it saw: callers that pass them run without an overlapped
        step in flight, as tests do.)"""
        if drafts is None and self._overlap_now():
            return self._step_overlapped()
        settled = self._settle_inflight() if self._inflight is not None else []
        return settled + self._step_plain(drafts)

    def _step_plain(self, drafts: Drafts | None) -> list[StepOutput]:
        started, drafted = time.perf_counter(), None
        if drafts is None and self.drafter is not None:
            drafts, drafted = self._propose_or_skip()
        outputs = []
        for r, e in compile_failures(self.compiling):
            self._finish(r, "error")
            outputs.append(StepOutput(r, [], [], error=str(e), code=400))
        trees, forced = constrained_trees(drafts or {}, self.requests)
        batch = self.scheduler.schedule({rid: len(t) + 1 for rid, t in trees.items()})
        outputs += [StepOutput(r, [], []) for r in self.scheduler.ended]
        for r in self.scheduler.ended:
            self.requests.pop(r.rid, None)
            r.grammar = None
            if self.drafter is not None:
                self.drafter.release(r)
        self.scheduler.ended.clear()
        if not batch.seqs:
            wait_compiles(self.compiling)
            return outputs
        # Only pure-decode steps are timed for the policy (phases change below).
        timed = drafted is not None and not forced and all(s.req.phase is Phase.DECODE and s.num_logits
                                                           for s in batch.seqs)
        drafter_wants = self.drafter is not None and self.drafter.wants_prompt_hidden
        failed: list[StepOutput] | None = None
        try:
            logits, hidden, all_hidden, accepted = self._forward_and_accept(batch, trees, forced, drafter_wants)
        except Exception as e:
            if not is_alloc_failure(e):
                raise
            failed = self._fail_alloc(batch.seqs, e, rerun_decode=True)
        if failed is not None:  # outside the except block: its traceback held the step's tensors
            self._empty_device_cache()
            return outputs + failed
        row = 0
        token_row = 0
        done = 0  # seqs fully applied
        try:
            for done, s in enumerate(batch.seqs):
                req = s.req
                if all_hidden is not None and req.phase is Phase.PREFILL:
                    chunk = all_hidden[token_row : token_row + s.q_len]
                    if drafter_wants:
                        self.drafter.observe_prompt(req, s.start, chunk)
                    if self.cfg.export_prompt_hidden:
                        req.keep_prompt_hidden(s.start, chunk.clone())
                    if req.params.prompt_logprobs_start is not None:
                        record_prompt_logprobs(self.loaded.model, req, s.start, chunk)
                token_row += s.q_len
                if not s.num_logits:
                    self.scheduler.advance(s, s.start + s.q_len)
                    continue
                tokens, logprobs, path = accepted[req.rid]
                if req.phase is Phase.DECODE:
                    self._count_accepted(req, len(tokens), drafted, req.rid in forced)
                if self.drafter is not None and self.drafter.reads_hidden:
                    # Views only where a drafter reads them: a few us each, per request per step.
                    if path == list(range(path[0], path[0] + len(path))):  # a chain's accepted run
                        rows = hidden[row + path[0] : row + path[0] + len(path)]
                    else:
                        rows = hidden[to_device([row + j for j in path], torch.int64, hidden.device)]
                    self.drafter.observe(req, tokens, rows)
                elif self._observes:
                    self.drafter.observe(req, tokens, None)
                row += s.num_logits
                kept, reason, stop_reason = self._append(req, tokens)
                # KV is valid up to the token before the newest one (the last sampled token and
                # the accepted drafts were inputs of this forward; the bonus token was not).
                self.scheduler.advance(s, req.seq_len - 1)
                if reason is not None:
                    self._finish(req, reason, stop_reason)
                plan_jump(req, self.jumper, self.max_model_len, MAX_JUMP_TOKENS)
                if logprobs:
                    req.output_logprobs += logprobs[: len(kept)]
                outputs.append(StepOutput(req, kept, logprobs[: len(kept)]))
        except Exception as e:
            if not is_alloc_failure(e):
                raise
            failed = self._fail_alloc(batch.seqs[done:], e, rerun_decode=False)
        if failed is not None:
            logits = hidden = all_hidden = rows = chunk = None  # views of the step's tensors: let them go
            self._empty_device_cache()
            return outputs + failed
        if timed:
            # What the policy weighs drafting by: the step's wall time (taken after the host
            # read of the sampled tokens, so the device work is in it) and tokens gained.
            gained = sum(len(accepted[s.req.rid][0]) for s in batch.seqs) / len(batch.seqs)
            self.policy.record_step(len(batch.seqs), drafted, time.perf_counter() - started, gained)
        return outputs

    def _forward_and_accept(self, batch: Batch, trees: dict[str, DraftTree | PendingDraft], forced: set[str],
                            drafter_wants: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
        """The step's device work, which changes no request: the forward, then sampling or
        speculative acceptance (and the tree KV compaction, which moves KV only at positions
        past what the requests have computed). Returns (logits, hidden, the prompt rows'
        hidden states or None, rid -> (tokens, logprobs, rows that produced them)). `forced`:
        the requests whose tree is a jump-forward run (accepted whole)."""
        seq_trees = {s.req.rid: trees[s.req.rid].truncated(s.q_len - 1)
                     for s in batch.seqs if s.q_len > 1 and s.req.phase is Phase.DECODE}
        want_prompt = ((drafter_wants or self.cfg.export_prompt_hidden)
                       and any(s.req.phase is Phase.PREFILL for s in batch.seqs)) \
            or any(wants_prompt_logprobs(s.req) for s in batch.seqs)
        logits, hidden, all_hidden = self.runner.forward(batch, seq_trees, all_hidden=want_prompt)
        self.num_forwards += 1
        maybe_inject_alloc_failure(self.num_forwards, batch.num_tokens)
        sampled = [s for s in batch.seqs if s.num_logits]
        self.grammars.mask_batch(sampled, logits, seq_trees)
        if seq_trees:
            accepted = self._accept(sampled, seq_trees, logits, hidden, forced)
            self._compact_tree_kv(sampled, seq_trees, accepted)
        else:
            accepted = {rid: (toks, lps, [0]) for rid, (toks, lps) in self._sample(sampled, logits).items()}
        return logits, hidden, all_hidden, accepted

    def _fail_alloc(self, seqs: list[ScheduledSeq], e: BaseException, rerun_decode: bool) -> list[StepOutput]:
        """After an allocation failure in a step of `seqs`: finish the requests it fails
        (alloc_failure.step_victims says which) with finish_reason "error" (pages freed;
        full pages of KV computed before this step stay in the prefix cache) and return
        their outputs, `error` set. The rest run again next step."""
        victims = step_victims(seqs, rerun_decode)
        self.num_alloc_failures += 1
        detail = alloc_failure_detail(e)
        log.warning(
            "a step of %d requests (%d new tokens) ran out of memory on %s: %s. Failed: %s. Run again next step: "
            "%d of its requests. Allocator: %s",
            len(seqs), sum(s.q_len for s in seqs), self.device, detail, ", ".join(r.rid for r in victims),
            len(seqs) - len(victims), " ".join(str(e).split()),
        )
        memory = "GPU" if self.device.type == "cuda" else "host"
        outs = []
        for req in victims:
            req.hold_kv = False  # a prefill worker's request: nothing will be sent, free its pages
            self._finish(req, "error")
            outs.append(StepOutput(req, [], [], error=(
                f"the engine step of request {req.rid} ran out of {memory} memory ({detail}); "
                f"retry it (the server may be busy), or send a shorter prompt")))
        if self.drafter is not None:
            # The failed verify may have moved drafter state past the rows that run again (a
            # drafter queues its next drafts before the host read).
            for s in seqs:
                if not s.req.finished:
                    self.drafter.release(s.req)
        return outs

    def _empty_device_cache(self) -> None:
        """After an allocation failure: hand the caching allocator's free blocks back, so the
        next step does not fail on fragments of the one that did."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _finish(self, req: Req, reason: str, stop_reason: str | int | None = None) -> None:
        if req.num_pending:  # placeholders of a step in flight (overlap.py): that row is void
            del req.output_ids[-req.num_pending :]
            req.num_pending = 0
            req.num_computed = min(req.num_computed, req.seq_len)  # the KV the step in flight writes stays valid
        self.scheduler.finish(req, reason, stop_reason)
        self.requests.pop(req.rid, None)
        req.grammar = None
        if self.drafter is not None:
            self.drafter.release(req)

    def _sampling_batch(self, reqs: list[Req], steps: list[int]) -> SamplingBatch:
        params = [r.params for r in reqs]
        need_tokens = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        return SamplingBatch.build(
            params,
            [r.seed for r in reqs],
            steps,
            self.model_config.vocab_size,
            self.device,
            prompt_and_output_tokens=[r.all_ids for r in reqs] if need_tokens else None,
            output_tokens=[r.output_ids for r in reqs] if need_tokens else None,
        )

    def _sample(self, seqs: list, logits: torch.Tensor) -> dict[str, tuple[list[int], list[TokenLogprob]]]:
        reqs = [s.req for s in seqs]
        if all(plain_greedy(r.params) for r in reqs):
            # The common serving case: skip building per-request sampling tensors.
            return {r.rid: ([t], []) for r, t in zip(reqs, logits.argmax(dim=-1).tolist())}
        out = self.sampler(logits, self._sampling_batch(reqs, [len(r.output_ids) for r in reqs]))
        tokens = out.tokens.tolist()
        lps = self._logprobs(reqs, out, range(len(reqs)))
        return {r.rid: ([t], [lp] if lp else []) for r, t, lp in zip(reqs, tokens, lps)}

    def _logprobs(self, reqs: list[Req], out, rows) -> list[TokenLogprob | None]:
        if out.logprobs is None:
            return [None] * len(reqs)
        chosen = out.logprobs.tolist()
        ids = out.top_ids.tolist() if out.top_ids is not None else None
        vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        res: list[TokenLogprob | None] = []
        for r, row, tok in zip(reqs, rows, out.tokens.tolist()):
            k = r.params.logprobs
            if k is None:
                res.append(None)
                continue
            top = list(zip(ids[row][:k], vals[row][:k])) if ids is not None and k else []
            res.append(TokenLogprob(tok, chosen[row], top))
        return res

    def _append(self, req: Req, tokens: list[int]) -> tuple[list[int], str | None, int | None]:
        """Append sampled tokens up to the first stop condition; returns (kept tokens,
        finish reason or None, the stop token id if one ended it). A constrained request's
        matcher accepts each token once (tokens it accepted already, the first token of
        add_prefilled, are not accepted again) and ends the request when its grammar is
        complete: xgrammar allows a stop token only where the grammar may end."""
        p = req.params
        g = req.grammar
        for i, t in enumerate(tokens):
            if g is not None and len(req.output_ids) >= g.num_accepted and not g.accept(t):
                # Only a row whose every token was masked gets here (a bug, not bad input).
                log.warning("%s: token %d is not allowed by the request's %s; ending it", req.rid, t, g.param)
                return tokens[:i], "stop", None
            req.output_ids.append(t)
            n = len(req.output_ids)
            if n >= p.min_tokens and not p.ignore_eos and t in self.eos_ids:
                return tokens[: i + 1], "stop", t
            if n >= p.min_tokens and t in p.stop_token_ids:
                return tokens[: i + 1], "stop", t
            if g is not None and g.terminated:
                return tokens[: i + 1], "stop", t
            if n >= p.max_tokens or req.seq_len >= self.max_model_len:
                return tokens[: i + 1], "length", None
        return tokens, None, None
