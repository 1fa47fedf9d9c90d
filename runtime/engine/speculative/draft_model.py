"""Draft-model speculation: a smaller model with the target's tokenizer proposes k tokens by
argmax. A greedy drafter is deterministic (its q is one-hot), which is exactly what
EngineCore._accept assumes, so sampled outputs keep the target's distribution.

The draft model has its own paged KV pool and attention backend. Per request it remembers
how many leading tokens of req.all_ids have valid draft KV (`computed`). propose() runs one
batched catch-up forward over each request's all_ids[computed:] (the tokens accepted since
its last proposal, or the whole prompt the first time), then k-1 batched single-token
forwards that feed back the argmax, writing the drafts' KV at positions seq_len.. as they go.
observe() keeps that speculative KV only as far as the drafts match what was accepted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from runtime.engine.speculative.base import Drafter
from runtime.engine.attention import make_attention_backend
from runtime.engine.kv_pool import KVPool
from runtime.engine.request import Req
from runtime.engine.runner import ModelRunner
from runtime.engine.scheduler import Batch, ScheduledSeq
from runtime.engine.weights import load_model

if TYPE_CHECKING:
    from runtime.engine.core import EngineCore


@dataclass
class _DraftSeq:
    """What ModelRunner reads of a request: rid, tokens (the drafts so far appended), pages."""

    rid: str
    all_ids: list[int]
    pages: list[int]  # the request's draft-pool pages (the same list as _State.pages)

    def ids_between(self, start: int, end: int) -> list[int]:
        return self.all_ids[start:end]

    def token_at(self, pos: int) -> int:
        return self.all_ids[pos]


@dataclass
class _State:
    pages: list[int] = field(default_factory=list)  # draft-pool pages, positions [0, len*page_size)
    computed: int = 0  # leading tokens of req.all_ids whose draft KV is valid
    base: int = 0  # req.seq_len when `drafts` were proposed
    drafts: list[int] = field(default_factory=list)  # the last proposal; KV written for all but the last


class DraftModelDrafter(Drafter):
    name = "draft"
    reads_hidden = False  # it runs its own model on the tokens

    def __init__(self, core: "EngineCore", num_pages: int | None = None) -> None:
        """num_pages: draft KV pool size, page 0 included (None: as many as the target's pool,
        capped on CUDA by half the memory still free after loading the draft model)."""
        cfg = core.cfg
        target_dtype = core.loaded.dtype
        # A dummy target (benchmarks without weights) gets a dummy draft; otherwise the
        # draft's own format is detected (a GGUF target may have a safetensors draft).
        self.loaded = load_model(
            cfg.draft_model, device=core.device, dtype=str(target_dtype).removeprefix("torch."),
            load_format="dummy" if cfg.load_format == "dummy" else "auto",
        )
        mc = self.loaded.config
        if mc.vocab_size != core.model_config.vocab_size:
            raise ValueError(
                f"draft model {cfg.draft_model!r} has a vocabulary of {mc.vocab_size} tokens, the target "
                f"{core.model_config.vocab_size}: the draft must share the target's tokenizer"
            )
        ps = core.pool.page_size
        if num_pages is None:
            num_pages = core.pool.num_pages
            if core.device.type == "cuda":
                per_page = KVPool.bytes_per_page(mc.num_layers, ps, mc.num_kv_heads, mc.head_dim, target_dtype)
                free, _ = torch.cuda.mem_get_info(core.device)
                num_pages = max(2, min(num_pages, free // 2 // per_page + 1))
        self.pool = KVPool(mc.num_layers, num_pages, ps, mc.num_kv_heads, mc.head_dim, target_dtype, core.device)
        attn = make_attention_backend(
            cfg.attention_backend, core.device, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim, dtype=target_dtype,
        )
        self.loaded.model.fuse_projections()
        graphs = None
        if core.runner.graphs is not None:  # CUDA with a graph-capable backend, as the target
            from runtime.engine.core import graph_rows
            from runtime.engine.cuda_graph import CudaGraphDecoder

            graphs = CudaGraphDecoder(self.loaded.model, self.pool, graph_rows(cfg), core.max_model_len)
        self.runner = ModelRunner(self.loaded.model, self.pool, attn, core.device, graphs)
        self.states: dict[str, _State] = {}

    # ---- the Drafter seam ----------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int]]:
        live = {r.rid for r in reqs}
        work: list[tuple[_State, _DraftSeq]] = []
        for req in reqs:
            st = self.states.setdefault(req.rid, _State())
            n = req.seq_len
            st.drafts = []
            # Recompute at least the last token: its logits give the first draft.
            st.computed = min(st.computed, n - 1)
            # KV for every position up to the last draft fed back (d_k itself is never fed).
            if not self._reserve(st, n + k - 1, live):
                self.pool.shrink_to(st.pages, st.computed)
                continue
            st.base = n
            work.append((st, _DraftSeq(req.rid, req.all_ids, st.pages)))
        if not work:
            return {}
        # Catch-up: rows all_ids[computed:seq_len] at positions computed..seq_len-1.
        seqs = [ScheduledSeq(v, st.computed, st.base - st.computed, 1) for st, v in work]  # type: ignore[arg-type]
        logits = self.runner.forward(Batch(seqs)).logits  # fp32 [B, V]
        for step in range(k):
            for (st, v), t in zip(work, logits.argmax(dim=-1).tolist()):
                st.drafts.append(t)
                v.all_ids.append(t)
            if step == k - 1:
                break
            # Feed draft step+1 back at position seq_len+step.
            seqs = [ScheduledSeq(v, st.base + step, 1, 1) for st, v in work]  # type: ignore[arg-type]
            logits = self.runner.forward(Batch(seqs)).logits
        for st, _ in work:
            st.computed = st.base  # the drafts' KV is speculative until observe() confirms it
        return {v.rid: list(st.drafts) for st, v in work}

    def observe(self, req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        st = self.states.get(req.rid)
        if st is None:
            return
        # Called before `accepted` is appended, so req.seq_len is still the proposal's base
        # when the proposal belongs to this step. Draft KV at base+j holds drafts[j] (for all
        # but the last draft) and is valid while the drafts match the accepted tokens.
        if st.drafts and st.base == req.seq_len:
            match = 0
            for d, a in zip(st.drafts[:-1], accepted):
                if d != a:
                    break
                match += 1
            st.computed = st.base + match
        st.drafts = []
        st.computed = min(st.computed, req.seq_len + len(accepted) - 1)
        self.pool.shrink_to(st.pages, st.computed)

    def release(self, req: Req) -> None:
        self._drop(req.rid)

    # ---- draft pool pages ----------------------------------------------------------------
    def _reserve(self, st: _State, tokens: int, live: set[str]) -> bool:
        """Make st hold pages for `tokens` positions. When the pool is short, first drop the
        state of requests not in this proposal (retracted or prefilling: they would be
        recomputed anyway). False, with st unchanged, when there is still no room."""
        need = self.pool.pages_for(tokens) - len(st.pages)
        if self.pool.num_free < need:
            for rid in [r for r in self.states if r not in live]:
                self._drop(rid)
                if self.pool.num_free >= need:
                    break
        return self.pool.grow_to(st.pages, tokens)

    def _drop(self, rid: str) -> None:
        st = self.states.pop(rid, None)
        if st is not None and st.pages:
            self.pool.free(st.pages)
