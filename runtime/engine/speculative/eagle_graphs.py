"""CUDA graphs of the EAGLE drafter (eagle.py): the head's catch-up steps as a model that
CudaGraphDecoder replays (HeadStep), and the draft steps of a chain or tree (GrowGraphs)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from runtime.engine.speculative.eagle_head import EagleHead
from runtime.engine.draft_tree import DeviceDrafts
from runtime.engine.model import ForwardContext, LlamaForCausalLM

if TYPE_CHECKING:
    from runtime.engine.speculative.eagle import EagleDrafter, _State

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


class _BucketGraphs:
    """One CUDA graph per batch-size bucket of a drafter body that reads the states'
    committed counts, start positions and page tables from static buffers (filled from
    pinned host mirrors before each replay). Padded rows have no pages (table row of
    zeros) and write into the head pool's reserved page 0."""

    def __init__(self, drafter: "EagleDrafter", k: int, max_model_len: int, max_batch: int) -> None:
        from runtime.engine.cuda_graph import buckets_up_to

        self.d, self.k = drafter, k
        dev, pool = drafter.device, drafter.pool
        self.max_len = max_model_len + 2 * k + (k - 1) * drafter.branch  # verify rows, then draft nodes
        self.max_pages = pool.pages_for(self.max_len)
        self.max_batch = max_batch
        self.i64 = torch.zeros(2, max_batch, dtype=torch.int64, device=dev)  # committed, start
        self.table = torch.zeros(max_batch, self.max_pages, dtype=torch.int32, device=dev)
        self.host_i64 = torch.zeros(2, max_batch, dtype=torch.int64).pin_memory()
        self.host_table = torch.zeros(max_batch, self.max_pages, dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()
        self.buckets = buckets_up_to(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Grown] = {}

    def _attn(self, rows: int):
        from runtime.engine.attention.triton_backend import TritonAttention

        return TritonAttention.for_graph(rows, self.d.head.cfg.num_kv_heads, self.d.device, self.max_len)

    def _capture(self, body) -> None:
        """body(b) runs the drafter on the first b rows of the static buffers."""
        dev = self.d.device
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                body(b)  # warm-up: Triton compiles outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool, stream=stream):
                    self.outputs[b] = body(b)
                self.graphs[b] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)

    def _fill(self, states: list["_State"], k: int) -> int | None:
        """Copy the states' committed counts, starts and page tables in; the bucket, or None
        when they do not fit the graphs."""
        n = len(states)
        if k != self.k or n > self.max_batch or max(len(st.pages) for st in states) > self.max_pages:
            return None
        b = next(x for x in self.buckets if x >= n)
        self.copied.synchronize()  # as CudaGraphDecoder: the last run's copies read the buffers
        h64, table = self.host_i64.numpy(), self.host_table.numpy()
        h64[:, :b] = 0
        table[n:b] = 0  # padded rows: every slot maps to the reserved page 0
        for i, st in enumerate(states):
            h64[0, i], h64[1, i] = st.committed, st.start
            table[i, : len(st.pages)] = st.pages
        self.i64.copy_(self.host_i64, non_blocking=True)
        self.table[:b].copy_(self.host_table[:b], non_blocking=True)
        self.copied.record(torch.cuda.current_stream(self.d.device))
        return b

    def _result(self, b: int, n: int) -> Grown:
        self.graphs[b].replay()
        return Grown(*(None if t is None else t[:n] for t in self.outputs[b]))


class GrowGraphs(_BucketGraphs):
    """CUDA graphs of EagleDrafter._grow_device (draft steps 2..k and the tree selection).
    Each draft step is one small decoder layer plus an lm_head top-k: launched one kernel
    at a time they cost more than the target's whole graph-replayed step."""

    def __init__(self, drafter: "EagleDrafter", k: int, max_model_len: int, max_batch: int) -> None:
        super().__init__(drafter, k, max_model_len, max_batch)
        self.root = torch.zeros(max_batch, drafter.head.cfg.hidden_size, dtype=drafter.dtype, device=drafter.device)
        attns = {b: self._attn(b * drafter.branch) for b in self.buckets}
        self._capture(lambda b: drafter._grow_device(self.root[:b], self.i64[0, :b], self.i64[1, :b], self.table[:b],
                                                     k, attns[b], [1] * b))
        log.info("captured EAGLE draft-step graphs (k=%d, branch %d) for batch sizes %s", k, drafter.branch, self.buckets)

    def run(self, states: list["_State"], root: torch.Tensor, k: int) -> Grown | None:
        """Replay for these states, or None (eager) when they do not fit the graphs."""
        b = self._fill(states, k)
        if b is None:
            return None
        n = len(states)
        self.root[:n].copy_(root)
        self.root[n:b].zero_()
        return self._result(b, n)


class ContinueGraphs(_BucketGraphs):
    """CUDA graphs of EagleDrafter._continue_device: the acceptance, the catch-up of the
    verify rows along the accepted run and the next chain or tree in one replay
    (continue_after_verify's work, which as separate launches and two replays cost more
    host time than the GPU spent on it)."""

    def __init__(self, drafter: "EagleDrafter", k: int, max_model_len: int, max_batch: int) -> None:
        super().__init__(drafter, k, max_model_len, max_batch)
        dev, h = drafter.device, drafter.head.cfg.hidden_size
        tree = drafter.branch > 1
        self.width = drafter.max_nodes if tree else k  # draft nodes per request
        w = self.width
        # drafts, then for trees parents, depths, ancestor bits: int64 [4, max_batch, w]
        self.nodes = torch.zeros(4 if tree else 1, max_batch, w, dtype=torch.int64, device=dev)
        self.best = torch.zeros(max_batch * (w + 1), dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(max_batch * (w + 1), h, dtype=drafter.dtype, device=dev)
        attns = {b: (self._attn(b * (k + 1)), self._attn(b * drafter.branch)) for b in self.buckets}

        def body(b: int) -> Grown:
            nodes = [t[:b] for t in self.nodes] if tree else [self.nodes[0, :b], None, None, None]
            return drafter._continue_device(*nodes, self.best[: b * (w + 1)], self.hidden[: b * (w + 1)],
                                            self.i64[0, :b], self.i64[1, :b], self.table[:b], k, *attns[b], [1] * b)

        self._capture(body)
        log.info("captured EAGLE continued-drafting graphs (k=%d, branch %d) for batch sizes %s", k, drafter.branch,
                 self.buckets)

    def run(self, states: list["_State"], drafts: DeviceDrafts, best: torch.Tensor,
            hidden: torch.Tensor) -> Grown | None:
        """Replay for these states (best int64 [B*(n+1)], hidden [B*(n+1), H] of a verify
        step of `drafts`), or None when they do not fit the graphs."""
        if drafts.tokens.shape[1] != self.width:
            return None
        b = self._fill(states, drafts.max_depth)
        if b is None:
            return None
        n, rows, w = len(states), best.shape[0], self.width
        parts = [drafts.tokens] if drafts.parents is None else [drafts.tokens, drafts.parents, drafts.depths, drafts.bits]
        for buf, src in zip(self.nodes, parts):
            buf[:n].copy_(src)
            buf[n:b].zero_()
        self.best[:rows].copy_(best)
        self.best[rows : b * (w + 1)].zero_()
        self.hidden[:rows].copy_(hidden)
        return self._result(b, n)
