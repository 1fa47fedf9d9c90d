"""The EAGLE-style draft head (one decoder layer over the target's own features) and its
checkpoint format; eagle.py serves it as a drafter, train_draft.py trains it.

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
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.speculative.tree import DraftVocab
from runtime.engine.model import DecoderLayer, ForwardContext, LlamaForCausalLM, RMSNorm, Rotary, apply_rotary
from runtime.engine.model_config import ModelConfig

CONFIG_FILE = "eagle_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "runtime-eagle-v1"
DRAFT_IDS = "draft_ids"  # model.safetensors key of the optional draft vocabulary


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
        # The draft vocabulary (int64 [V_d], sorted token ids; None: all of lm_head's). Not a
        # parameter: train-draft picks the tokens the target generates most.
        self.draft_ids: torch.Tensor | None = None

    @classmethod
    def for_target(cls, target: LlamaForCausalLM) -> "EagleHead":
        """A fresh head for `target` (fp32, on the target's device)."""
        head = cls(replace(target.config, num_layers=1))
        head.to(target.lm_head.weight.device)
        with torch.no_grad():
            head.norm.weight.copy_(target.model.norm.weight.float())
        return head

    def vocab(self, lm_head: torch.Tensor) -> DraftVocab:
        """What drafts are scored over, from the target's lm_head weight [V, H]."""
        if self.draft_ids is None:
            return DraftVocab(lm_head)
        ids = self.draft_ids.to(lm_head.device)
        return DraftVocab(lm_head[ids].contiguous(), ids)

    def project(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """emb, feat [..., H] -> the decoder layer's input [..., H]."""
        return self.fc(torch.cat((emb, feat.to(emb.dtype)), dim=-1))

    # ---- serving: packed rows over the paged head cache ---------------------------------------
    def forward(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """emb, feat [T, H], positions int64 [T] -> predicted features [T, H]."""
        x = self.project(emb, feat)
        h, residual = self.layer(x, None, self.rotary(positions, x.dtype), ctx)
        return self.norm(h, residual)[0]  # norm(h + residual), one fused launch on CUDA

    # ---- training: dense [B, T] batches, plain causal attention --------------------------------
    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] (project's output), positions int64 [B, T] -> q [B, Hq, T, D],
        k, v [B, Hkv, T, D], rotary applied: the decoder layer's attention inputs."""
        cfg, attn = self.cfg, self.layer.self_attn
        b, t, _ = x.shape
        h = self.layer.input_layernorm(x)
        cos, sin = self.rotary(positions.reshape(-1), x.dtype)
        cos, sin = cos.view(b, t, 1, -1), sin.view(b, t, 1, -1)
        q, k, v = attn.project(h)
        q = apply_rotary(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
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
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    if head.draft_ids is not None:
        tensors[DRAFT_IDS] = head.draft_ids.detach().cpu().long().contiguous()
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
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
        "draft_vocab_size": None if head.draft_ids is None else int(head.draft_ids.numel()),
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
    draft_ids = state.pop(DRAFT_IDS, None)
    if draft_ids is not None and (draft_ids.dim() != 1 or not len(draft_ids) or int(draft_ids.min()) < 0
                                  or int(draft_ids.max()) >= target_config.vocab_size):
        raise ValueError(f"{path}/{WEIGHTS_FILE}: {DRAFT_IDS} must be token ids in [0, {target_config.vocab_size})")
    expected = {k: tuple(p.shape) for k, p in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not fit the head's shape: {diff[:8]}")
    head.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    head.rotary = Rotary(cfg).to(device)  # non-persistent rope buffer, fp32
    head.meta = meta
    head.draft_ids = None if draft_ids is None else draft_ids.long().to(device)
    head.eval()
    head.requires_grad_(False)
    return head
