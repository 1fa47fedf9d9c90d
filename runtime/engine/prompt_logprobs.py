"""Prompt logprobs for scoring (SamplingParams.prompt_logprobs_start): the logprob of given
prompt tokens, read off the hidden states a prefill chunk computes anyway. What `select`
of runtime.lang ranks its choices by: the choices are prompt continuations that share the
prompt's cached KV, so scoring N choices is one batched prefill of the choices' tokens."""
from __future__ import annotations

import torch

from runtime.engine.request import Phase, Req


def wants_prompt_logprobs(req: Req) -> bool:
    return req.params.prompt_logprobs_start is not None and req.phase is Phase.PREFILL


@torch.inference_mode()
def record_prompt_logprobs(model: torch.nn.Module, req: Req, start: int, hidden: torch.Tensor) -> None:
    """`hidden` [q, H]: the final hidden states of positions start .. start+q-1 of `req`.
    The row of position p predicts the token at p+1; keep those with p+1 in
    [prompt_logprobs_start, len(prompt)). Logits only for those rows (a [rows, V] fp32
    tensor, not [q, V])."""
    want = req.params.prompt_logprobs_start
    first = max(start, want - 1)
    end = min(start + len(hidden), len(req.prompt_ids) - 1)
    if first >= end:
        return
    logits = model.compute_logits(hidden[first - start : end - start])  # fp32 [rows, V]
    targets = torch.tensor(req.prompt_ids[first + 1 : end + 1], dtype=torch.int64, device=logits.device)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0].tolist()
    for p, v in zip(range(first + 1, end + 1), lp):
        req.prompt_logprobs[p] = v
