"""CUDA graphs of the EAGLE drafter (eagle.py): the head's catch-up steps as a model that
CudaGraphDecoder replays (HeadStep), and the draft steps of a chain or tree (GrowGraphs)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from runtime.decode.speculative.eagle_head import EagleHead
from runtime.engine.model import ForwardContext, LlamaForCausalLM

if TYPE_CHECKING:
    from runtime.decode.speculative.eagle import EagleDrafter, _State

log = logging.getLogger("runtime.speculative")


class Grown(NamedTuple):
    """One propose's drafts, on the device: DeviceDrafts' fields (None for chains)."""

    tokens: torch.Tensor
    parents: torch.Tensor | None
    depths: torch.Tensor | None
    bits: torch.Tensor | None



class HeadStep(nn.Module):
    """The head shaped like a target model for CudaGraphDecoder: token ids in, predicted
    features out. The features paired with the tokens are read from `feats` (filled before
    each replay); `compute_logits` passes the features through (the drafter scores them)."""

    def __init__(self, head: EagleHead, target: LlamaForCausalLM, max_rows: int) -> None:
        super().__init__()
        self.head = head
        self.embed = target.model.embed_tokens
        w = target.lm_head.weight
        self.feats = torch.zeros(max_rows, head.cfg.hidden_size, dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.head(self.embed(input_ids), self.feats[: input_ids.shape[0]], positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class GrowGraphs:
    """CUDA graphs of EagleDrafter._grow_device (draft steps 2..k and the tree selection),
    one per batch-size bucket. Each draft step is one small decoder layer plus an lm_head
    top-k: launched one kernel at a time they cost more than the target's whole graph-
    replayed step. Padded rows have no pages (table row of zeros) and write into the head
    pool's reserved page 0."""

    def __init__(self, drafter: "EagleDrafter", k: int, max_model_len: int, max_batch: int) -> None:
        from runtime.engine.attention.triton_backend import TritonAttention
        from runtime.engine.cuda_graph import buckets_up_to
        from kernels.paged_decode import default_num_splits

        self.d, self.k = drafter, k
        dev, pool = drafter.device, drafter.pool
        tree_slots = (k - 1) * drafter.branch
        self.max_pages = pool.pages_for(max_model_len + tree_slots)
        self.max_batch = max_batch
        h = drafter.head.cfg.hidden_size
        self.root = torch.zeros(max_batch, h, dtype=drafter.dtype, device=dev)
        self.i64 = torch.zeros(2, max_batch, dtype=torch.int64, device=dev)  # committed, start
        self.table = torch.zeros(max_batch, self.max_pages, dtype=torch.int32, device=dev)
        self.host_i64 = torch.zeros(2, max_batch, dtype=torch.int64).pin_memory()
        self.host_table = torch.zeros(max_batch, self.max_pages, dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()
        self.buckets = buckets_up_to(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Grown] = {}
        hkv = drafter.head.cfg.num_kv_heads
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                rows = b * drafter.branch
                attn = TritonAttention(num_splits=default_num_splits(rows, hkv, dev, max_model_len + tree_slots))
                args = (self.root[:b], self.i64[0, :b], self.i64[1, :b], self.table[:b], k, attn, [1] * b)
                drafter._grow_device(*args)  # warm-up: Triton compiles outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool, stream=stream):
                    self.outputs[b] = drafter._grow_device(*args)
                self.graphs[b] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        log.info("captured EAGLE draft-step graphs (k=%d, branch %d) for batch sizes %s", k, drafter.branch, self.buckets)

    def run(self, states: list["_State"], root: torch.Tensor, k: int,
            committed_add: torch.Tensor | None = None) -> Grown | None:
        """Replay for these states, or None (eager) when they do not fit the graphs."""
        n = len(states)
        if k != self.k or n > self.max_batch or max(len(st.pages) for st in states) > self.max_pages:
            return None
        b = next(x for x in self.buckets if x >= n)
        self.copied.synchronize()  # as CudaGraphDecoder: the last run's copies read the buffers
        h64, table = self.host_i64.numpy(), self.host_table.numpy()
        h64[:, :b] = 0
        table[n:b] = 0  # padded rows: every draft slot maps to the reserved page 0
        for i, st in enumerate(states):
            h64[0, i], h64[1, i] = st.committed, st.start
            table[i, : len(st.pages)] = st.pages
        self.i64.copy_(self.host_i64, non_blocking=True)
        self.table[:b].copy_(self.host_table[:b], non_blocking=True)
        self.copied.record(torch.cuda.current_stream(self.d.device))
        if committed_add is not None:
            self.i64[0, :n] += committed_add
        self.root[:n].copy_(root)
        self.root[n:b].zero_()
        self.graphs[b].replay()
        return Grown(*(None if t is None else t[:n] for t in self.outputs[b]))
