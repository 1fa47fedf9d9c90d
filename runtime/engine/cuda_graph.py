"""CUDA graphs for decode-shape steps: one captured forward (model + logits) per row-count
bucket, replayed with the step's inputs copied into static buffers. A row is one new token
with its own page-table row, key count and tree rule, so plain decode, speculative
verification (chains and trees) and drafters' catch-up steps all replay these graphs.

A decode step of a small model is hundreds of tiny kernels; launching them one by one
from Python costs more than running them. Replaying a graph launches them all at once.
Padded rows (bucket > batch) read and write only the reserved page 0.
"""
from __future__ import annotations

import logging

import torch

from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.triton_backend import TritonAttention
from runtime.engine.draft_tree import DeviceDrafts
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, LlamaForCausalLM
from runtime.engine.page_table import PageTableRows

log = logging.getLogger("runtime.engine")


def buckets_up_to(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return [b for b in sizes if b < max_batch] + [max_batch]


class CudaGraphDecoder:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, max_batch: int, max_model_len: int) -> None:
        self.model = model
        self.pool = pool
        self.device = pool.kv.device
        self.max_batch = max_batch
        ps = pool.page_size
        self.max_pages = -(-max_model_len // ps)
        dev = self.device
        # Static inputs, shared by every bucket (a bucket uses the first b rows). Each step
        # fills pinned host mirrors and copies what its bucket reads with two async H2D copies.
        # ids, positions, slots, tree bits
        self._i64 = torch.zeros(4, max_batch, dtype=torch.int64, device=dev)
        # kv_lens, tree_start, page table
        self._i32 = torch.zeros(max_batch * (2 + self.max_pages), dtype=torch.int32, device=dev)
        self.input_ids, self.positions, self.out_slots, self.tree_bits = self._i64
        self.kv_lens = self._i32[:max_batch]
        self.tree_start = self._i32[max_batch : 2 * max_batch]
        self.page_table = self._i32[2 * max_batch :].view(max_batch, self.max_pages)
        self.kv_lens.fill_(1)
        self.tree_start.fill_(1)
        pin = torch.cuda.is_available()
        self._host_i64 = torch.zeros_like(self._i64, device="cpu").pin_memory() if pin else None
        self._host_i32 = torch.ones_like(self._i32, device="cpu").pin_memory() if pin else None
        # The page-table rows of the pinned mirror, kept from step to step (page_table.py).
        self._table = PageTableRows(self._host_i32.numpy()[2 * max_batch :].reshape(max_batch, self.max_pages)) \
            if pin else None
        # Recorded after each run's host-to-device copies: work queued behind a run may not
        # have started when the host fills the buffers again (continue_after_verify).
        self._copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.buckets = buckets_up_to(max_batch)
        self._capture(max_model_len)

    def _forward(self, b: int, attn: TritonAttention) -> tuple[torch.Tensor, torch.Tensor]:
        meta = AttentionMetadata(
            q_lens=torch.ones(b, dtype=torch.int32, device=self.device),
            kv_lens=self.kv_lens[:b],
            cu_q_lens=torch.arange(b + 1, dtype=torch.int32, device=self.device),
            page_table=self.page_table[:b],
            q_lens_cpu=[1] * b,
            kv_lens_cpu=[self.max_pages * self.pool.page_size] * b,  # sizes the split count only
            page_size=self.pool.page_size,
            tree_start=self.tree_start[:b],
            tree_bits=self.tree_bits[:b],
        )
        attn.prepare(meta)
        ctx = ForwardContext(self.pool, attn, self.out_slots[:b])
        hidden = self.model(self.input_ids[:b], self.positions[:b], ctx)
        return self.model.compute_logits(hidden), hidden

    @torch.inference_mode()
    def _capture(self, max_model_len: int) -> None:
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
                attn = TritonAttention()
                self._forward(b, attn)  # warm-up: Triton compiles outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool, stream=stream):
                    self.outputs[b] = self._forward(b, attn)
                self.graphs[b] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, batch_size: int, max_pages: int) -> bool:
        return batch_size <= self.max_batch and max_pages <= self.max_pages

    def run(
        self, input_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], page_lists: list[list[int]],
        kv_lens: list[int], tree_start: list[int] | None = None, tree_bits: list[int] | None = None,
        device_rows: tuple[DeviceDrafts, tuple[list[int], list[int]]] | None = None,
        future: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over N decode-shape rows; returns (logits [N, V], hidden [N, H]),
        views of the graph's static outputs (valid until the next run). input_ids may be
        an int64 device tensor [N]; `device_rows` fills draft rows from the device
        (DeviceDrafts.write_rows); `future` = (tokens, rows, picks): input_ids[rows] =
        tokens[picks] on the device (the tokens of the step in flight, overlap.py)."""
        n = len(input_ids)
        b = next(x for x in self.buckets if x >= n)
        mb = self.max_batch
        self._copied.synchronize()  # the last run's copies must have read the host buffers
        h64, h32 = self._host_i64.numpy(), self._host_i32.numpy()
        ids_on_device = input_ids if isinstance(input_ids, torch.Tensor) else None
        h64[0, :n] = 0 if ids_on_device is not None else input_ids
        h64[1, :n], h64[2, :n] = positions, slots
        h64[3, :n] = tree_bits if tree_bits is not None else 0
        h64[:, n:b] = 0  # padded rows: token 0 at position 0, KV written into page 0
        h32[:n] = kv_lens
        h32[mb : mb + n] = tree_start if tree_start is not None else kv_lens
        h32[n:b] = 1
        h32[mb + n : mb + b] = 1
        self._table.fill(page_lists)  # what changed since the last step (page_table.py)
        self._table.table[n:b, 0] = 0
        self._table.forget(n, b)
        self._i64.copy_(self._host_i64, non_blocking=True)
        # kv_lens and tree_start, then the page-table rows of this bucket only (the layout puts
        # them first): the whole table is max_batch rows of max_pages (0.5 MB at 256 rows of
        # 8,192 tokens), copied before every replay on the replay's stream.
        used = 2 * mb + b * self.max_pages
        self._i32[:used].copy_(self._host_i32[:used], non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.device))  # the device named: no lookup
        if ids_on_device is not None:  # e.g. a drafter's previous step output: no host sync
            self.input_ids[:n].copy_(ids_on_device)
        if device_rows is not None:
            drafts, rows = device_rows
            drafts.write_rows(rows, self.input_ids, self.positions, self.tree_bits)
        if future is not None:
            src, at, pick = future
            self.input_ids[at] = src[pick]
        self.graphs[b].replay()
        logits, hidden = self.outputs[b]
        return logits[:n], hidden[:n]
