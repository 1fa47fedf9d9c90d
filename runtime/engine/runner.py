"""Turns a scheduled batch into tensors, runs the model, and returns the logits rows."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from runtime.engine.attention.base import AttentionBackend, AttentionMetadata
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext, LlamaForCausalLM
from runtime.engine.scheduler import Batch

if TYPE_CHECKING:  # imports Triton, which CPU-only installs lack
    from runtime.engine.cuda_graph import CudaGraphDecoder


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        attn: AttentionBackend,
        device: torch.device,
        graphs: CudaGraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn
        self.device = device
        self.graphs = graphs

    @torch.inference_mode()
    def forward(self, batch: Batch, drafts: dict[str, list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits fp32 [N, V], hidden [N, hidden]) for the rows that need logits,
        sequence by sequence in batch order. `drafts` (rid -> draft tokens) extends a
        decoding sequence's input past its last sampled token."""
        ps = self.pool.page_size
        drafts = drafts or {}
        if self.graphs is not None and all(s.q_len == 1 for s in batch.seqs):
            if self.graphs.can_run(len(batch.seqs), max(len(s.req.pages) for s in batch.seqs)):
                return self._decode_graph(batch)
        tokens: list[int] = []
        logit_rows: list[int] = []
        for s in batch.seqs:
            ids = s.req.all_ids
            extra = drafts.get(s.req.rid)
            if extra:
                ids = ids + extra
            tokens += ids[s.start : s.start + s.q_len]
            end = len(tokens)
            logit_rows += range(end - s.num_logits, end)
        q_lens = [s.q_len for s in batch.seqs]
        kv_lens = [s.start + s.q_len for s in batch.seqs]
        meta = AttentionMetadata.build(
            q_lens, kv_lens, [s.req.pages for s in batch.seqs], ps, self.device
        )
        dev = self.device
        # Positions and KV slots of every new token, computed on device.
        seq_of_row = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), meta.q_lens.long())
        starts = torch.tensor([s.start for s in batch.seqs], dtype=torch.int64, device=dev)
        positions = starts[seq_of_row] + torch.arange(len(tokens), device=dev) - meta.cu_q_lens[:-1].long()[seq_of_row]
        pages = meta.page_table.long()[seq_of_row, positions // ps]
        out_slots = pages * ps + positions % ps
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=dev)
        self.attn.prepare(meta)
        hidden = self.model(input_ids, positions, ForwardContext(self.pool, self.attn, out_slots))
        hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=dev)]
        return self.model.compute_logits(hidden), hidden

    def _decode_graph(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.pool.page_size
        seqs = batch.seqs
        positions = [s.start for s in seqs]
        slots = [s.req.pages[p // ps] * ps + p % ps for s, p in zip(seqs, positions)]
        return self.graphs.run(
            [s.req.token_at(s.start) for s in seqs],
            positions,
            slots,
            [s.req.pages for s in seqs],
            [p + 1 for p in positions],
        )
