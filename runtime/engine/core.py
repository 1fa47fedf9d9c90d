"""EngineCore: one model, one KV pool, one prefix cache, one scheduler; `step()` runs one
forward over the scheduled batch and returns what each request gained. Shared by the
offline `Engine`, the prefill worker and the decode worker."""
from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass

import torch

from runtime.config import EngineConfig
from runtime.engine.attention import make_attention_backend
from runtime.engine.kv_pool import KVPool
from runtime.engine.radix_cache import NoPrefixCache, RadixCache
from runtime.engine.request import Phase, Req, TokenLogprob
from runtime.engine.runner import ModelRunner
from runtime.engine.sampler import Sampler, SamplingBatch, uniform_noise
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.scheduler import Batch, Scheduler, SchedulerConfig
from runtime.engine.weights import LoadedModel, load_model

log = logging.getLogger("runtime.engine")

CPU_KV_TOKENS = 32768


@dataclass
class StepOutput:
    req: Req
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]

    @property
    def finished(self) -> bool:
        return self.req.finished


def _plain_greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0.0 and p.logprobs is None and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


class EngineCore:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self.device = cfg.torch_device
        self.loaded = loaded or load_model(
            cfg.model, device=self.device, dtype=cfg.dtype, load_format=cfg.load_format
        )
        mc = self.loaded.config
        self.loaded.model.fuse_projections()
        self.model_config = mc
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        dtype = next(self.loaded.model.parameters()).dtype
        num_pages = self._num_pages(dtype)
        self.pool = KVPool(mc.num_layers, num_pages, cfg.page_size, mc.num_kv_heads, mc.head_dim, dtype, self.device)
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
        self.attn = make_attention_backend(
            cfg.attention_backend, self.device, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim, dtype=dtype,
        )
        graphs = None
        if self.device.type == "cuda" and cfg.cuda_graph and self.attn.name != "torch":
            from runtime.engine.cuda_graph import CudaGraphDecoder

            graphs = CudaGraphDecoder(
                self.loaded.model, self.pool, min(cfg.cuda_graph_max_batch, cfg.max_running), self.max_model_len
            )
        self.runner = ModelRunner(self.loaded.model, self.pool, self.attn, self.device, graphs)
        self.sampler = Sampler()
        self.eos_ids = set(mc.eos_token_ids)
        tok = self.loaded.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        self.requests: dict[str, Req] = {}
        from runtime.decode.speculative import SpeculationPolicy, make_drafter

        self.drafter = make_drafter(cfg.speculative, self)
        self.policy = SpeculationPolicy(cfg.num_draft_tokens, cfg.speculative_policy, cfg.speculative_max_batch)
        # Tokens gained per decode step and request (the bonus token included), for the
        # accept-length histogram; workers drain it into heartbeats.
        self.accept_samples: deque[int] = deque()
        self._rng = random.Random(cfg.seed)
        self._arrivals = 0
        log.info(
            "engine ready: %s on %s (%s), %d KV pages x %d tokens, attention=%s",
            self.loaded.name, self.device, dtype, self.pool.total_pages, cfg.page_size, self.attn.name,
        )

    def _num_pages(self, dtype: torch.dtype) -> int:
        cfg, mc = self.cfg, self.model_config
        per_page = KVPool.bytes_per_page(mc.num_layers, cfg.page_size, mc.num_kv_heads, mc.head_dim, dtype)
        if cfg.kv_cache_tokens is not None:
            tokens = cfg.kv_cache_tokens
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and the sampler's [batch, vocab] tensors.
            budget = int(free * cfg.kv_mem_fraction) - (1 << 30)
            return max(2, budget // per_page + 1)
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
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Req(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed, arrival=self._arrivals)
        self._arrivals += 1
        self.scheduler.add(req)
        self.requests[rid] = req
        return req

    def add_prefilled(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, pages: list[int],
        first_token: int, first_logprob: TokenLogprob | None, cached_tokens: int,
    ) -> StepOutput:
        """Start decoding a request whose prompt KV is already in `pages` (sent by a prefill
        worker, which also sampled the first token). Returns the first token's output."""
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Req(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed, arrival=self._arrivals,
                  cached_tokens=cached_tokens)
        self._arrivals += 1
        self.requests[rid] = req
        self.scheduler.add_prefilled(req, pages)
        kept, reason, stop_reason = self._append(req, [first_token])
        req.num_computed = len(req.prompt_ids)
        if reason is not None:
            self._finish(req, reason, stop_reason)
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
        return self.scheduler.has_work

    # ---- one step ------------------------------------------------------------------------
    def step(self, drafts: dict[str, list[int]] | None = None) -> list[StepOutput]:
        """One forward. `drafts` (rid -> proposed next tokens) makes a decoding request
        verify them in this forward (the speculative path); accepted tokens are exact."""
        if drafts is None and self.drafter is not None:
            drafts = self._propose()
        drafts = {rid: d for rid, d in (drafts or {}).items() if d}
        batch = self.scheduler.schedule({rid: len(d) + 1 for rid, d in drafts.items()})
        outputs = [StepOutput(r, [], []) for r in self.scheduler.ended]
        for r in self.scheduler.ended:
            self.requests.pop(r.rid, None)
            if self.drafter is not None:
                self.drafter.release(r)
        self.scheduler.ended.clear()
        if not batch.seqs:
            return outputs
        seq_drafts = {s.req.rid: drafts[s.req.rid][: s.q_len - 1] for s in batch.seqs if s.q_len > 1 and s.req.phase is Phase.DECODE}
        logits, hidden = self.runner.forward(batch, seq_drafts)
        sampled = [s for s in batch.seqs if s.num_logits]
        if seq_drafts:
            accepted = self._accept(sampled, seq_drafts, logits)
        else:
            accepted = self._sample(sampled, logits)
        row = 0
        for s in batch.seqs:
            if not s.num_logits:
                self.scheduler.advance(s, s.start + s.q_len)
                continue
            req = s.req
            tokens, logprobs = accepted[req.rid]
            rows = hidden[row : row + len(tokens)]
            row += s.num_logits
            if req.phase is Phase.DECODE:
                req.num_steps += 1
                if self.drafter is not None:
                    self.accept_samples.append(len(tokens))
                    self.policy.record(len(seq_drafts.get(req.rid, ())), len(tokens) - 1)
            if self.drafter is not None:
                self.drafter.observe(req, tokens, rows)
            kept, reason, stop_reason = self._append(req, tokens)
            # KV is valid up to the token before the newest one (the last sampled token and
            # the accepted drafts were inputs of this forward; the bonus token was not).
            self.scheduler.advance(s, req.seq_len - 1)
            if reason is not None:
                self._finish(req, reason, stop_reason)
            if logprobs:
                req.output_logprobs += logprobs[: len(kept)]
            outputs.append(StepOutput(req, kept, logprobs[: len(kept)]))
        return outputs

    def _propose(self) -> dict[str, list[int]]:
        reqs = [r for r in self.scheduler.running if r.phase is Phase.DECODE]
        k = self.policy.num_draft_tokens(len(reqs))
        if not k or not reqs:
            return {}
        drafts = self.drafter.propose(reqs, k)
        for r in reqs:
            d = drafts.get(r.rid)
            if d:
                # Never verify past max_tokens or the context: those rows would be wasted.
                room = min(r.params.max_tokens - len(r.output_ids), self.max_model_len - r.seq_len) - 1
                drafts[r.rid] = d[: max(0, min(k, room))]
        return drafts

    def _finish(self, req: Req, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(req, reason, stop_reason)
        self.requests.pop(req.rid, None)
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
        if all(_plain_greedy(r.params) for r in reqs):
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

    def _accept(self, seqs: list, drafts: dict[str, list[int]], logits: torch.Tensor) -> dict[str, tuple[list[int], list[TokenLogprob]]]:
        """Speculative acceptance over rows [last, d1..dk] of each request: d_{j+1} is kept
        with probability p_j(d_{j+1}) (the target's final distribution at row j; 1 or 0
        under greedy), and the first rejected row samples from p_j with d_{j+1} removed and
        renormalised. For a deterministic drafter (q one-hot) this is exactly rejection
        sampling with min(1, p/q) and residual max(0, p - q), so outputs keep the target's
        distribution; under greedy it is exact match plus the target's own token."""
        reqs, steps, nxt = [], [], []
        for s in seqs:
            d = drafts.get(s.req.rid, [])
            for j in range(s.num_logits):
                reqs.append(s.req)
                steps.append(len(s.req.output_ids) + j)
                nxt.append(d[j] if j < len(d) else -1)
        sb = self._sampling_batch(reqs, steps)
        probs = self.sampler.probs(logits, sb)  # [N, V]
        nxt_t = torch.tensor(nxt, dtype=torch.int64, device=logits.device)
        has = nxt_t >= 0
        p_draft = probs.gather(1, nxt_t.clamp(min=0)[:, None])[:, 0]
        u = uniform_noise(sb.seed, sb.step, 1, stream=1)[:, 0]
        keep = has & (u < p_draft)
        residual = probs.scatter(1, nxt_t.clamp(min=0)[:, None], 0.0) * has[:, None] + probs * (~has)[:, None]
        race = residual / -torch.log(uniform_noise(sb.seed, sb.step, probs.shape[1], stream=0))
        alt = race.argmax(dim=1)
        keep_l, alt_l = keep.tolist(), alt.tolist()
        raw_lp = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        result: dict[str, tuple[list[int], list[TokenLogprob]]] = {}
        row = 0
        for s in seqs:
            d = drafts.get(s.req.rid, [])
            a = 0
            while a < len(d) and keep_l[row + a]:
                a += 1
            tokens = d[:a] + [alt_l[row + a]]
            lps: list[TokenLogprob] = []
            if raw_lp is not None and s.req.params.logprobs is not None:
                k = s.req.params.logprobs
                for j, t in enumerate(tokens):
                    lp_row = raw_lp[row + j]
                    top = torch.topk(lp_row, k) if k else None
                    lps.append(TokenLogprob(t, lp_row[t].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
            result[s.req.rid] = (tokens, lps)
            row += s.num_logits
        return result

    def _append(self, req: Req, tokens: list[int]) -> tuple[list[int], str | None, int | None]:
        """Append sampled tokens up to the first stop condition; returns (kept tokens,
        finish reason or None, the stop token id if one ended it)."""
        p = req.params
        for i, t in enumerate(tokens):
            req.output_ids.append(t)
            n = len(req.output_ids)
            if n >= p.min_tokens and not p.ignore_eos and t in self.eos_ids:
                return tokens[: i + 1], "stop", t
            if n >= p.min_tokens and t in p.stop_token_ids:
                return tokens[: i + 1], "stop", t
            if n >= p.max_tokens or req.seq_len >= self.max_model_len:
                return tokens[: i + 1], "length", None
        return tokens, None, None
