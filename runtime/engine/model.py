"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over the paged KV cache.

Parameter names follow the Hugging Face checkpoints, so safetensors load without renaming.
All tokens of a step are packed into one sequence of T rows; `ForwardContext` says where
each row's key/value goes in the cache and how rows attend (see attention/base.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.attention.base import AttentionBackend
from runtime.engine.kernel_dispatch import fuse_on, fused_gemv, fused_kernels, gemv_args, linear
from runtime.engine.kv_pool import KVPool
from runtime.engine.model_config import ModelConfig
from runtime.engine.quant import Int8Linear, Payload, QuantLinear, build_linear, fuse_payloads
from runtime.engine.quant.base import DENSE_ABOVE

if TYPE_CHECKING:
    from runtime.engine.cpu_decode import FlatLayers


@dataclass
class ForwardContext:
    kv: KVPool
    attn: AttentionBackend  # already prepared with this step's metadata
    out_slots: torch.Tensor  # int64 [T] device: page * page_size + offset for each new token

    @functools.cached_property
    def kv_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of each new token's slot: computed once per forward for every layer's
        KV store (pages are strided in the page-major pool, so a flat slot cannot index it)."""
        ps = self.kv.page_size
        return self.out_slots // ps, self.out_slots % ps


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        if x.dim() == 2 and fused_kernels(x):  # packed rows (serving); dense batches stay on torch
            from runtime.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)  # with residual: in place
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu:
            return apply_rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 like the reference implementation, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm._norm's math on CPU: torch's CPU rms_norm is that math as one call (upcast,
    x * rsqrt(mean(x^2) + eps), cast back), so the same bits with less dispatch
    (tests/unit/test_cpu_decode.py checks it); CUDA's is a fused kernel that rounds otherwise."""
    return weight * F.rms_norm(x, weight.shape, eps=eps)


def _fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One GEMM for several projections of the same input (their outputs concatenated)."""
    w = torch.cat([p.weight for p in parts])
    bias = parts[0].bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if bias:
        out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, smooth between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_table(self, max_len: int, dtype: torch.dtype) -> None:
        """Precompute cos and sin of positions < max_len (the caller never goes past it):
        on CUDA a forward then gathers two rows instead of running seven small kernels.
        The values are the ones forward computes."""
        self._table = self._compute(torch.arange(max_len, device=self.inv_freq.device), dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for int64 positions [T]; computed once per forward, used by every layer."""
        table = self._table
        if table is not None and positions.is_cuda and table[0].dtype == dtype:
            return table[0][positions], table[1][positions]
        return self._compute(positions, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] in HF's rotate-half layout."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary in place, in five ops whatever the head count (q and k of a fused
    projection go through together, where rotating each took seven): the same products and
    sum, so the same bits."""
    t, h, d = x.shape
    rot = x.view(t, h, 2, d // 2).flip(2)  # (x2, x1): rotate_half before its sign
    rot[:, :, 0].neg_()
    rot = rot.view(t, h, d).mul_(sin)
    return x.mul_(cos).add_(rot)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def fuse(self) -> None:
        if hasattr(self, "qkv_proj"):
            return
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., hidden] -> q [..., q_size], k, v [..., kv_size], fused or not."""
        cfg = self.cfg
        if hasattr(self, "qkv_proj"):
            return linear(self.qkv_proj, x, attn_block=True).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        if "qkv_proj" in self._modules:
            return self.from_qkv(linear(self.qkv_proj, x, attn_block=True), rope, ctx)
        return linear(self.o_proj, attend(torch.cat(self.project(x), dim=-1), rope, ctx, self.layer_id, self.cfg,
                                          self.scale), attn_block=True)

    def from_qkv(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        """The rest of the block after the fused q|k|v projection [T, q + 2 kv]: rotary, the
        KV store, attention and o_proj."""
        cfg = self.cfg
        if qkv.dim() == 2 and fused_kernels(qkv):
            from runtime.kernels.rope_kv import rope_store_kv

            t = qkv.shape[0]
            k_cache, v_cache = ctx.kv.k_cache(self.layer_id), ctx.kv.v_cache(self.layer_id)
            q = rope_store_kv(qkv, *rope, k_cache, v_cache, ctx.out_slots, cfg.num_heads, cfg.num_kv_heads,
                              cfg.head_dim)
            attn = ctx.attn.forward(q, k_cache, v_cache, self.scale).reshape(t, cfg.q_size)
            return linear(self.o_proj, attn, attn_block=True)
        return linear(self.o_proj, attend(qkv, rope, ctx, self.layer_id, cfg, self.scale), attn_block=True)


def attend(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext, layer_id: int,
           cfg: ModelConfig, scale: float) -> torch.Tensor:
    """The torch path's attention of one layer, from the q|k|v projection [T, q + 2 kv] to
    the output before o_proj [T, q_size]. q and k are adjacent in it, and so are k and v: one
    rotary in place over q|k, then one store of k|v ([T, 2, Hkv, D]) into the pool."""
    t = qkv.shape[0]
    qk = qkv[:, : cfg.q_size + cfg.kv_size].view(t, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
    apply_rotary_(qk, *rope)
    ctx.kv.store(layer_id, ctx.kv_index, qkv[:, cfg.q_size :].view(t, 2, cfg.num_kv_heads, cfg.head_dim))
    out = ctx.attn.forward(qk[:, : cfg.num_heads], ctx.kv.k_cache(layer_id), ctx.kv.v_cache(layer_id), scale)
    return out.reshape(t, cfg.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fuse(self) -> None:
        if hasattr(self, "gate_up_proj"):
            return
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "gate_up_proj"):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down(linear(self.gate_up_proj, x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up) of the fused gate|up projection [T, 2 * I]; decode rows
        with RUNTIME_GEMV_FUSE on: one gemv that computes the SiLU product as it reads it."""
        if gate_up.dim() == 2 and fused_kernels(gate_up):
            if fuse_on(gate_up):
                args = gemv_args(self.down_proj, gate_up[:, : gate_up.shape[1] // 2])
                out = fused_gemv("gemv_silu_mul", gate_up, **args) if args is not None else None
                if out is not None:
                    return out
            from runtime.kernels.silu_mul import silu_and_mul

            return linear(self.down_proj, silu_and_mul(gate_up))
        return linear(self.down_proj, silu_mul(gate_up))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate|up projection [T, 2 * I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# (block, fused projection, its parts under HF names)
_PROJECTIONS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", "o_proj", ("o_proj",)),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
    ("mlp", "down_proj", ("down_proj",)),
)
_PROJECTION_PARTS = frozenset(p for _, _, parts in _PROJECTIONS for p in parts)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added): the add is
        fused into the next RMSNorm."""
        attn, mlp = self.self_attn, self.mlp
        if fuse_on(x) and "qkv_proj" in attn._modules and "gate_up_proj" in mlp._modules:
            # Decode rows with RUNTIME_GEMV_FUSE on: each RMSNorm (with its residual add) runs
            # inside the gemv of the projection after it, where that projection runs one.
            qkv, residual = self._norm_linear(self.input_layernorm, attn.qkv_proj, x, residual, attn_block=True)
            gate_up, residual = self._norm_linear(self.post_attention_layernorm, mlp.gate_up_proj,
                                                  attn.from_qkv(qkv, rope, ctx), residual)
            return mlp.down(gate_up), residual
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, ctx), residual)
        return self.mlp(h), residual

    @staticmethod
    def _norm_linear(norm: RMSNorm, proj: nn.Linear | QuantLinear, x: torch.Tensor, residual: torch.Tensor | None,
                     attn_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(proj(norm(x + residual)), x + residual): one fused gemv where proj runs one, else
        the RMSNorm kernel and proj. Without a residual (the first layer) x is the stream."""
        args = gemv_args(proj, x, attn_block)
        if args is not None:
            out = fused_gemv("gemv_rmsnorm", x, residual, norm.weight, norm.eps, **args)
            if out is not None:
                return out
        if residual is None:
            return linear(proj, norm(x), attn_block), x
        h, residual = norm(x, residual)
        return linear(proj, h, attn_block), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        # CPU serving: the layers' decode-sized forwards without module dispatch (cpu_decode.py)
        self.flat: FlatLayers | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        if self.flat is not None and x.shape[0] <= DENSE_ABOVE and x.is_cpu and not torch.is_grad_enabled():
            x, residual = self.flat(x, rope, ctx)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, rope, ctx)
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.quantization = "none"  # the projections' scheme (build_projections)
        self.lm_head_q: QuantLinear | None = None  # CPU int8/int4 serving: lm_head for few rows
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: int64 [T]. Returns final hidden states [T, hidden]."""
        return self.model(input_ids, positions, ctx)

    def fuse_projections(self) -> None:
        """Serve with one q|k|v GEMM and one gate|up GEMM per layer (after loading); on CPU
        also with the flat decode path over them (a later change of the layers must call this
        again)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if self.lm_head.weight.is_cpu:
            from runtime.engine.cpu_decode import FlatLayers

            self.model.flat = FlatLayers.build(self.model.layers)

    def build_projections(self, read: Callable[[str], Payload], scheme: str, dtype: torch.dtype,
                          group_size: int | None = None, dense_prefill: bool = False) -> None:
        """Replace every layer's projections by fused layers of `scheme` (quant/payload.py),
        reading each part's weight (and bias) under its HF name from `read`, one layer at a
        time (the dense parts are freed as each fused layer is built, unless dense_prefill
        keeps them, in `dtype`, beside CPU int8/int4 layers for prefill-sized inputs)."""
        cfg = self.config
        for i, layer in enumerate(self.model.layers):
            for block, fused, parts in _PROJECTIONS:
                mod = getattr(layer, block)
                pre = f"model.layers.{i}.{block}."
                weight = fuse_payloads([read(pre + p + ".weight") for p in parts])
                bias = None
                if cfg.qkv_bias and fused == "qkv_proj":
                    bias = torch.cat([read(pre + p + ".bias") for p in parts])  # type: ignore[misc]
                for p in parts:
                    if hasattr(mod, p):
                        delattr(mod, p)
                setattr(mod, fused, build_linear(weight, bias, scheme, dtype, group_size, dense_prefill))

    def quantize_lm_head_for_decode(self, dtype: torch.dtype) -> None:
        """CPU int8/int4 serving in bf16/fp16: an int8 copy of lm_head (per-row scales) for
        decode-sized inputs, half the bytes the bf16 head costs each decode step (fp32, asked
        for reference precision, keeps the dense head alone)."""
        if dtype != torch.float32:
            self.lm_head_q = Int8Linear.from_float(self.lm_head.weight.detach(), None, dtype)

    def projection_names(self) -> set[str]:
        """The HF names of the parameters build_projections reads."""
        return {k for k, _ in self.named_parameters() if any(f".{b}." in k for b, _, _ in _PROJECTIONS)
                and k.rsplit(".", 2)[-2] in _PROJECTION_PARTS}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names (fused projections split back, as views;
        quantized ones dequantized into the model's dtype)."""
        cfg = self.config
        out = {}
        state = self.state_dict()
        dtype = self.lm_head.weight.dtype
        for name, mod in self.named_modules():
            if isinstance(mod, QuantLinear):
                for k in [k for k in state if k.startswith(name + ".")]:
                    del state[k]
                if mod is self.lm_head_q:  # a serving copy of lm_head, not a weight of its own
                    continue
                state[name + ".weight"] = mod.dequantize(dtype)
                if mod.bias is not None:
                    state[name + ".bias"] = mod.bias
        for name, t in state.items():
            if ".qkv_proj." in name:
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([cfg.q_size, cfg.kv_size, cfg.kv_size])):
                    out[name.replace("qkv_proj", part)] = piece
            elif ".gate_up_proj." in name:
                for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
                    out[name.replace("gate_up_proj", part)] = piece
            else:
                out[name] = t
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        if hidden.device.type == "cpu":
            if self.lm_head_q is not None and hidden.shape[0] <= DENSE_ABOVE:
                return self.lm_head_q.matmul(hidden.contiguous()).float()
            # CPU GEMM is ~25% faster as W @ x^T than x @ W^T for this skinny shape (measured).
            return torch.matmul(self.lm_head.weight, hidden.t()).t().float()
        return linear(self.lm_head, hidden).float()  # decode rows: the gemv where the bf16 table measured it faster
