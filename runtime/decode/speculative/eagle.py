"""EAGLE-style draft head (chain drafting) over the target's own features.

Notation: x_p is the token at position p, f_p the target's final hidden state at p (after
the final RMSNorm, the input of lm_head), so lm_head(f_p) scores x_{p+1}.

The head reads the pair (x_p, f_{p-1}) -- a token and the feature that produced it -- and
predicts f_p:

    h   = fc(concat(embed(x_p), f_{p-1}))          # Linear(2H -> H), with bias
    h   = DecoderLayer(h)                          # one layer, the target's head shape,
                                                   # attending over earlier pairs (own KV cache)
    f^_p = RMSNorm_head(h)                         # head-owned norm
    logits = lm_head(f^_p)                         # the target's lm_head, shared and frozen

Why a norm of its own, and why before emitting the feature: our features are post-norm,
so the decoder layer's residual stream has to be mapped into that space the way the
target's final norm does it. The head's norm (initialised from the target's final norm)
does exactly that, so a predicted feature lives in the same space as a real one: it is
regressed against f_p, fed to lm_head as is, and fed back as the next step's input. The
embedding and lm_head are the target's (never saved with the head).

Chain drafting with k steps: step 1 runs the head over the newest pair (x_S, f_{S-1})
(together with any earlier pairs not yet cached), d1 = argmax lm_head(f^_S); step j feeds
(d_{j-1}, f^_{S+j-2}). Argmax drafts make the drafter deterministic (q one-hot), which is
what EngineCore._accept assumes.

The head's KV cache is a 1-layer paged KVPool. Pair i of a request sits in slot i of its
head pages at rope position start + i (start: the target position of its first pair).
Pairs built from real features (delivered by observe) are "committed"; draft pairs are
written past them and simply overwritten by the next catch-up (their pages are freed
after each propose). The engine reports features only for rows that produced tokens, so
the head's context starts at the first generated token: prompt positions contribute
through f_{L-1} (which summarises the prompt) but are not cached pairs. train_draft.py
trains under exactly this regime.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.decode.speculative.base import Drafter
from runtime.engine.attention import AttentionMetadata, make_attention_backend
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import DecoderLayer, ForwardContext, LlamaForCausalLM, RMSNorm, Rotary, apply_rotary
from runtime.engine.model_config import ModelConfig
from runtime.engine.request import Req

if TYPE_CHECKING:
    from runtime.engine.core import EngineCore

log = logging.getLogger("runtime.speculative")

CONFIG_FILE = "eagle_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "runtime-eagle-v1"
# Pairs observed but not yet cached (drafting was off, e.g. a large batch under the
# adaptive policy). Past this the head context restarts instead of growing without bound.
MAX_PENDING = 256


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        """cfg: the head's layer shape (the target's, with num_layers 1)."""
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layer = DecoderLayer(cfg, 0)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.meta: dict[str, Any] = {}  # eagle_config.json of a loaded head

    @classmethod
    def for_target(cls, target: LlamaForCausalLM) -> "EagleHead":
        """A fresh head for `target` (fp32, on the target's device)."""
        head = cls(replace(target.config, num_layers=1))
        head.to(target.lm_head.weight.device)
        with torch.no_grad():
            head.norm.weight.copy_(target.model.norm.weight.float())
        return head

    def project(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """emb, feat [..., H] -> the decoder layer's input [..., H]."""
        return self.fc(torch.cat((emb, feat.to(emb.dtype)), dim=-1))

    # ---- serving: packed rows over the paged head cache ---------------------------------------
    def forward(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """emb, feat [T, H], positions int64 [T] -> predicted features [T, H]."""
        x = self.project(emb, feat)
        h, residual = self.layer(x, None, self.rotary(positions, x.dtype), ctx)
        return self.norm(h + residual)

    # ---- training: dense [B, T] batches, plain causal attention --------------------------------
    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] (project's output), positions int64 [B, T] -> q [B, Hq, T, D],
        k, v [B, Hkv, T, D], rotary applied: the decoder layer's attention inputs."""
        cfg, attn = self.cfg, self.layer.self_attn
        b, t, _ = x.shape
        h = self.layer.input_layernorm(x)
        cos, sin = self.rotary(positions.reshape(-1), x.dtype)
        cos, sin = cos.view(b, t, 1, -1), sin.view(b, t, 1, -1)
        q = apply_rotary(attn.q_proj(h).view(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(attn.k_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = attn.v_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """x [B, T, H], attention output [B, Hq, T, D] -> predicted features [B, T, H]."""
        b, _, t, _ = attn_out.shape
        x = x + self.layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
        x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
        return self.norm(x)

    def forward_dense(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """emb, feat [B, T, H], positions [B, T] -> predicted features [B, T, H]. Causal;
        right padding only disturbs the padded rows."""
        x = self.project(emb, feat)
        q, k, v = self.qkv(x, positions)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.layer.self_attn.scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return self.finish(x, out)


def save_head(path: str, head: EagleHead, meta: dict[str, Any]) -> None:
    """Write `path`/model.safetensors (the head's own weights, fp32) and eagle_config.json
    (its shape, the target it was trained for, and `meta`: training settings and scores)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
              os.path.join(path, WEIGHTS_FILE))
    c = head.cfg
    config = {
        "format": FORMAT,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "rms_norm_eps": c.rms_norm_eps,
        "qkv_bias": c.qkv_bias,
        **meta,
    }
    with open(os.path.join(path, CONFIG_FILE), "w") as fh:
        json.dump(config, fh, indent=2)


def load_head(path: str, target_config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> EagleHead:
    """A head saved by save_head, checked against the target it will draft for."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not an EAGLE head (no {CONFIG_FILE}); train one with `runtime train-draft`")
    with open(cfg_path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("hidden_size", "vocab_size"):
        if meta[key] != getattr(target_config, key):
            raise ValueError(
                f"EAGLE head {path} was trained for a target with {key}={meta[key]}, but the served model has "
                f"{getattr(target_config, key)} (trained for {meta.get('target_model', '?')}): train a head for this model"
            )
    cfg = replace(
        target_config, num_layers=1, num_heads=meta["num_heads"], num_kv_heads=meta["num_kv_heads"],
        head_dim=meta["head_dim"], intermediate_size=meta["intermediate_size"], qkv_bias=meta["qkv_bias"],
    )
    with torch.device("meta"):
        head = EagleHead(cfg)
    state = load_file(os.path.join(path, WEIGHTS_FILE), device="cpu")
    expected = {k: tuple(p.shape) for k, p in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not fit the head's shape: {diff[:8]}")
    head.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    head.rotary = Rotary(cfg).to(device)  # non-persistent rope buffer, fp32
    head.meta = meta
    head.eval()
    head.requires_grad_(False)
    return head


@dataclass
class _State:
    """One request's head context. Pair i (slot i of `pages`) is at position start + i."""

    start: int
    pages: list[int] = field(default_factory=list)
    committed: int = 0  # pairs whose KV (from real features) is in the head cache
    tokens: list[int] = field(default_factory=list)  # pairs observed, not yet cached
    feats: list[torch.Tensor] = field(default_factory=list)  # their features, chunks [n, H]
    last: tuple[int, torch.Tensor] | None = None  # the newest pair, redone when nothing is pending

    @property
    def next_pos(self) -> int:
        return self.start + self.committed + len(self.tokens)


class EagleDrafter(Drafter):
    name = "eagle"

    def __init__(self, core: "EngineCore") -> None:
        loaded = core.loaded
        self.target = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.head = load_head(core.cfg.draft_model, core.model_config, self.device, self.dtype)
        trained_for = self.head.meta.get("target_model")
        if trained_for and trained_for != loaded.name:
            log.warning("EAGLE head %s was trained for %s, serving %s: drafts may be poor (outputs stay exact)",
                        core.cfg.draft_model, trained_for, loaded.name)
        hc = self.head.cfg
        ps = core.cfg.page_size
        self.pool = KVPool(1, self._num_pages(core), ps, hc.num_kv_heads, hc.head_dim, self.dtype, self.device)
        self.attn = make_attention_backend(core.attn.name, self.device, num_q_heads=hc.num_heads,
                                           num_kv_heads=hc.num_kv_heads, head_dim=hc.head_dim, dtype=self.dtype)
        self.states: dict[str, _State] = {}

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
    def observe(self, req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        # Called before the tokens are appended: accepted[j] lands at position seq_len + j
        # and hidden[j] is f at the position before it, so (accepted[j], hidden[j]) is a pair.
        if hidden is None or not accepted:
            return
        if hidden.shape[0] != len(accepted):
            raise ValueError(f"observe: {len(accepted)} tokens but {hidden.shape[0]} hidden rows")
        pos = req.seq_len
        st = self.states.get(req.rid)
        if st is not None and (st.next_pos != pos or len(st.tokens) + len(accepted) > MAX_PENDING):
            self._drop(req.rid)  # out of step (or too far behind): restart the head context here
            st = None
        if st is None:
            st = self.states[req.rid] = _State(start=pos)
        rows = hidden.detach().clone()  # CUDA-graph decode returns views of static buffers
        st.tokens += accepted
        st.feats.append(rows)
        st.last = (accepted[-1], rows[-1:])

    def release(self, req: Req) -> None:
        self._drop(req.rid)

    @torch.inference_mode()
    def propose(self, reqs: list[Req], k: int) -> dict[str, list[int]]:
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
                # request): redo the newest pair, whose output is draft step 1.
                if st.committed == 0 or st.last is None:
                    continue
                st.committed -= 1
                st.tokens, st.feats = [st.last[0]], [st.last[1]]
            if not self.pool.grow_to(st.pages, st.committed + len(st.tokens) + k - 1):
                self._drop(r.rid)
                continue
            batch.append((r, st))
        if not batch:
            return {}
        ps = self.pool.page_size
        # Step 1: cache every pending pair (catch-up) and predict from the newest one.
        tokens, slots, q_lens, kv_lens = [], [], [], []
        for _, st in batch:
            tokens += st.tokens
            slots += range(st.committed, st.committed + len(st.tokens))
            q_lens.append(len(st.tokens))
            kv_lens.append(st.committed + len(st.tokens))
        feats = torch.cat([f for _, st in batch for f in st.feats])
        starts = [st.start for _, st in batch for _ in st.tokens]
        owners = [st for _, st in batch for _ in st.tokens]
        out = self._forward(torch.tensor(tokens, device=self.device), feats, [s + i for s, i in zip(starts, slots)],
                            [o.pages[i // ps] * ps + i % ps for o, i in zip(owners, slots)], q_lens, kv_lens, batch)
        last = torch.tensor(q_lens).cumsum(0) - 1  # the newest pair's row of each request
        feat = out[last.to(self.device)]  # [B, H]
        for _, st in batch:
            st.committed += len(st.tokens)
            st.tokens, st.feats = [], []
        draft = self.target.compute_logits(feat).argmax(dim=-1)  # int64 [B]
        drafts = [draft]
        # Steps 2..k: one draft pair per request, written past the committed pairs.
        for j in range(1, k):
            slot = [st.committed + j - 1 for _, st in batch]
            feat = self._forward(
                draft, feat, [st.start + s for (_, st), s in zip(batch, slot)],
                [st.pages[s // ps] * ps + s % ps for (_, st), s in zip(batch, slot)],
                [1] * len(batch), [s + 1 for s in slot], batch,
            )
            draft = self.target.compute_logits(feat).argmax(dim=-1)
            drafts.append(draft)
        for _, st in batch:
            self.pool.shrink_to(st.pages, st.committed)  # free the pages of draft pairs only
        rows = torch.stack(drafts, dim=1).tolist()  # [B, k]
        return {r.rid: d for (r, _), d in zip(batch, rows)}

    # ---- internals ---------------------------------------------------------------------------
    def _forward(
        self, tokens: torch.Tensor, feats: torch.Tensor, positions: list[int], out_slots: list[int],
        q_lens: list[int], kv_lens: list[int], batch: list[tuple[Req, _State]],
    ) -> torch.Tensor:
        dev = self.device
        meta = AttentionMetadata.build(q_lens, kv_lens, [st.pages for _, st in batch], self.pool.page_size, dev)
        self.attn.prepare(meta)
        ctx = ForwardContext(self.pool, self.attn, torch.tensor(out_slots, dtype=torch.int64, device=dev))
        emb = self.target.model.embed_tokens(tokens)
        return self.head(emb, feats, torch.tensor(positions, dtype=torch.int64, device=dev), ctx)


    def _drop(self, rid: str) -> None:
        st = self.states.pop(rid, None)
        if st is not None and st.pages:
            self.pool.free(st.pages)
