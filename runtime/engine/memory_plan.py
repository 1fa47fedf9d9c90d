"""The GPU memory plan: how many KV pages a CUDA engine gets.

Before the KV pool exists, the largest work the scheduler can admit runs once (as vLLM's
profile run does): an eager forward of `max_batch_tokens` new tokens with logits for every
row that can need them, the sampler on those rows with every filter and penalty on, and a
forward of the decode graphs' largest row count (the CUDA graphs keep that much activation
memory for good). Their measured peaks, plus a stated margin, are kept out of the pool;
the KV pool gets the rest. The plan is logged at start.

Without this the pool took a fixed fraction of free memory and a big mixed batch could
ask for more than was left (on an H200, a prefill chunk among 64 decode rows asked for
8.12 GiB with ~8 GiB free, and the worker died).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime.common.sampling_params import SamplingParams
from runtime.engine.attention.base import AttentionBackend, AttentionMetadata
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, LlamaForCausalLM
from runtime.engine.sampler import Sampler, SamplingBatch

log = logging.getLogger("runtime.engine")

GiB = 1 << 30
# Kept free beyond the measured peaks: the drafter's weights and state (created after the
# pool), allocator fragmentation, NCCL/cuBLAS workspaces created later.
MARGIN_BYTES = 1 * GiB


@dataclass(frozen=True)
class MemoryPlan:
    total: int  # bytes on the device
    free_before: int  # free bytes before profiling (weights loaded)
    eager_peak: int  # peak activation bytes of the largest eager step (forward + logits + sampler)
    graph_peak: int  # activation bytes of the largest decode-graph forward (kept by the graphs)
    margin: int
    page_bytes: int
    num_pages: int
    profiled_tokens: int
    logit_rows: int
    graph_rows: int
    kv_mem_fraction: float

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def describe(self, page_size: int) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return (f"memory plan: {g(self.total)} on the device, {g(self.free_before)} free after the weights; "
                f"largest eager step ({self.profiled_tokens} tokens, {self.logit_rows} logit rows, sampler) "
                f"peaks at {g(self.eager_peak)}, decode graphs ({self.graph_rows} rows) {g(self.graph_peak)}; "
                f"KV pool {self.kv_mem_fraction:.0%} of the rest less a {g(self.margin)} margin: {g(self.kv_bytes)} "
                f"= {self.num_pages} pages = {self.num_pages * page_size} tokens")


def _profile_forward(model: LlamaForCausalLM, attn: AttentionBackend, pool: KVPool, tokens: int,
                     decode_shape: bool, logit_rows: int, max_model_len: int) -> torch.Tensor:
    """One forward of `tokens` new tokens writing and reading only page 0 (the profile's
    pool has no other), returning fp32 logits of the last `logit_rows` rows."""
    dev, ps = pool.kv.device, pool.page_size
    # One sequence of `tokens` keys (eager prefill), or one decode row per token (graphs).
    # Every page-table entry is page 0: the values are garbage, the shapes are real.
    if decode_shape:
        kv = [min(i + 1, max_model_len) for i in range(tokens)]
        q_lens, pages = [1] * tokens, [[0] * (-(-max(kv) // ps))] * tokens
    else:
        # A mixed batch (one-token rows and a long prompt): the same activations as one
        # prompt of `tokens`, and every attention launch a serving step can make compiles here
        # rather than stalling the first such step (seen: ~2 s of TTFT on the first mixed batch).
        rows = min(16, tokens - 1)
        rest = tokens - rows
        kv, q_lens = [1] * rows + [rest], [1] * rows + [rest]
        pages = [[0]] * rows + [[0] * (-(-rest // ps))]
    meta = AttentionMetadata.build(q_lens, kv, pages, ps, dev)
    attn.prepare(meta)
    ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
    positions = torch.arange(tokens, dtype=torch.int64, device=dev) % max_model_len
    slots = torch.arange(tokens, dtype=torch.int64, device=dev) % ps  # page 0's slots
    h = model(ids, positions, ForwardContext(pool, attn, slots))
    return model.compute_logits(h[-logit_rows:])


def _profile_sampler(logits: torch.Tensor, vocab: int) -> None:
    """The sampler's worst case on these rows: temperature, top-k/top-p/min-p, every penalty
    and top logprobs."""
    n = logits.shape[0]
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.1,
                             frequency_penalty=0.1, repetition_penalty=1.1, logprobs=20)] * n
    toks = [[1, 2, 3]] * n
    batch = SamplingBatch.build(params, list(range(n)), [0] * n, vocab, logits.device,
                                prompt_and_output_tokens=toks, output_tokens=toks)
    Sampler()(logits, batch)


@torch.inference_mode()
def plan_kv_pages(model: LlamaForCausalLM, attn: AttentionBackend, *, num_layers: int, page_size: int,
                  num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                  max_batch_tokens: int, max_running: int, graph_rows: int, max_model_len: int,
                  vocab_size: int, kv_mem_fraction: float, margin: int = MARGIN_BYTES) -> MemoryPlan:
    """Profile the largest steps and size the KV pool from what is left (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    scratch = KVPool(num_layers, 2, page_size, num_kv_heads, head_dim, dtype, device)
    tokens = max(1, min(max_batch_tokens, max_model_len))
    logit_rows = max(1, min(tokens, max(max_running, graph_rows)))

    def peak_of(fn) -> int:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)

    def eager() -> None:
        logits = _profile_forward(model, attn, scratch, tokens, False, logit_rows, max_model_len)
        _profile_sampler(logits, vocab_size)

    eager_peak = peak_of(eager)
    graph_peak = 0
    if graph_rows:
        graph_peak = peak_of(lambda: _profile_forward(model, attn, scratch, graph_rows, True, graph_rows,
                                                      max_model_len))
    del scratch
    torch.cuda.empty_cache()
    page_bytes = KVPool.bytes_per_page(num_layers, page_size, num_kv_heads, head_dim, dtype)
    # The scratch pool, the profile's activations and the allocator's cache are freed again:
    # the free memory measured before profiling is what the pool and the steps share.
    rest = free - eager_peak - graph_peak - margin
    budget = int(rest * kv_mem_fraction)
    num_pages = budget // page_bytes + 1  # +1: page 0 is reserved
    if num_pages < 2:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {free / GiB:.2f} GiB free after the weights, the largest step "
            f"needs {eager_peak / GiB:.2f} GiB and the decode graphs {graph_peak / GiB:.2f} GiB; lower "
            f"--max-batch-tokens, use a smaller model or dtype, or free the GPU")
    return MemoryPlan(total=total, free_before=free, eager_peak=eager_peak, graph_peak=graph_peak, margin=margin,
                      page_bytes=page_bytes, num_pages=num_pages, profiled_tokens=tokens, logit_rows=logit_rows,
                      graph_rows=graph_rows, kv_mem_fraction=kv_mem_fraction)
