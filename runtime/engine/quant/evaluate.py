"""Accuracy of a (quantized) model against a reference, from teacher-forced logits: the
next-token distributions of one fixed token sequence, in one prefill each. Used by
benchmarks/bench_quant.py and the quantization tests."""
from __future__ import annotations

import math

import torch

from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, LlamaForCausalLM


@torch.no_grad()
def sequence_logits(model: LlamaForCausalLM, ids: list[int], page_size: int = 16,
                    kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits [len(ids), vocab] of one sequence, prefilled through a scratch KV pool
    (of kv_dtype: None for the model's dtype, torch.float8_e4m3fn for an FP8 cache)."""
    cfg = model.config
    dev, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    n_pages = -(-len(ids) // page_size)
    kv = KVPool(cfg.num_layers, n_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype or dtype, dev)
    pages = kv.alloc(n_pages)
    attn = TorchAttention()
    attn.prepare(AttentionMetadata.build([len(ids)], [len(ids)], [pages], page_size, dev))
    pos = torch.arange(len(ids), device=dev)
    slots = torch.tensor(pages, device=dev)[pos // page_size] * page_size + pos % page_size
    hidden = model(torch.tensor(ids, device=dev), pos, ForwardContext(kv, attn, slots))
    return model.compute_logits(hidden)


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref || model) of the next-token distributions, in nats."""
    ref_lp, lp = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) under logits [len(ids), vocab]."""
    lp = logits[:-1].float().log_softmax(-1)
    target = torch.tensor(ids[1:], device=lp.device)
    return math.exp(-lp.gather(1, target[:, None]).mean().item())


def forced_agreement(model: LlamaForCausalLM, prompt: list[int], reference: list[int]) -> float:
    """Fraction of the reference's greedy tokens that are also this model's argmax when fed
    the reference prefix (each token judged on its own, unlike free-running agreement,
    where one early flip makes every later position differ)."""
    logits = sequence_logits(model, prompt + reference[:-1])
    picked = logits[len(prompt) - 1 :].argmax(-1).tolist()
    return sum(a == b for a, b in zip(picked, reference)) / len(reference)


def positional_agreement(reference: list[list[int]], outputs: list[list[int]]) -> float:
    """Free-running greedy agreement: matching positions over all reference tokens."""
    same = sum(a == b for ref, out in zip(reference, outputs) for a, b in zip(ref, out))
    return same / max(1, sum(len(r) for r in reference))
