"""Decode worker: reserves pages for incoming prompts, receives their KV from the prefill
worker, then decodes them in one continuous batch and streams tokens to the gateway.

Colocated (`runtime up --prefill 0`): it takes whole requests (GenerateTask), prefills them
itself with its own radix prefix cache, and decodes them in the same batch; no KV moves.
Everything after the first token (streaming, aborts, heartbeats) is shared by both modes."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from runtime import ipc
from runtime.common.logprobs import TokenLogprob
from runtime.config import ClusterConfig
from runtime.engine.alloc_failure import alloc_failure_detail, is_alloc_failure
from runtime.messages import (
    AbortTask, DecodeTask, GenerateTask, KVDestination, KVDone, RequestError, Streaming, TaskDone,
    TokenDelta, TokenDeltas, logprob_to_wire, params_from_dict,
)
from runtime.transfer import TransferState, make_transfer
from runtime.worker_base import Worker

log = logging.getLogger("runtime.decode")


@dataclass
class Incoming:
    task: DecodeTask
    pages: list[int]
    since: float
    done: KVDone | None = None  # KVDone arrived but the data is still landing (NIXL)


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, cfg: ClusterConfig, worker_id: int, inbox_addr: str | None = None) -> None:
        # Disaggregated, decode never matches prefixes: prompt KV arrives from the prefill
        # workers. Colocated, this worker's own prefix cache serves its prompts.
        engine = cfg.engine if cfg.colocated else replace(cfg.engine, prefix_cache=False)
        super().__init__(cfg, worker_id, inbox_addr or cfg.decode_addr(worker_id), engine)
        self.receiver = None if cfg.colocated else make_transfer(cfg.transfer, self.core.pool, worker_id, "decode")
        self.gateway = ipc.push(self.ctx, cfg.gateway_addr, guard=self.guard)
        self.pending: deque[DecodeTask] = deque()  # waiting for free pages
        self.incoming: dict[int, Incoming] = {}  # room -> reserved pages, waiting for KV
        self.handlers[AbortTask] = self.on_abort
        if cfg.colocated:
            self.handlers[GenerateTask] = self.on_generate
        else:
            self.handlers.update({DecodeTask: self.on_task, KVDone: self.on_kv_done})

    def load(self) -> tuple[int, int]:
        s = self.core.scheduler
        return len(s.running), len(s.waiting) + len(self.pending) + len(self.incoming)

    # ---- messages --------------------------------------------------------------------------
    async def on_generate(self, t: GenerateTask) -> None:
        try:
            self.core.add_request(t.rid, t.prompt_ids, params_from_dict(t.params))
        except ValueError as e:  # too long for the context or the KV pool
            await self._fail(t.rid, str(e), 400)

    async def on_task(self, t: DecodeTask) -> None:
        if len(t.prompt_ids) >= self.core.max_model_len:
            await self._fail(t.rid, f"prompt has {len(t.prompt_ids)} tokens; the context holds {self.core.max_model_len}", 400)
            return
        try:  # compile the grammar while the prefill worker runs (add_prefilled needs it)
            self.core.grammars.matcher(params_from_dict(t.params))
        except ValueError:
            pass  # the prefill worker rejects it with a 400
        self.pending.append(t)
        await self._admit()

    async def _admit(self) -> None:
        ps = self.core.pool.page_size
        while self.pending:
            t = self.pending[0]
            pages = self.core.scheduler.alloc_pages(-(-len(t.prompt_ids) // ps))
            if pages is None:
                return
            self.pending.popleft()
            self.incoming[t.room] = Incoming(t, pages, time.monotonic())
            await self.peer(t.prefill_addr).send(KVDestination(
                t.room, t.rid, self.id, pages, self.receiver.destination(t.room, pages)
            ))

    async def on_kv_done(self, d: KVDone) -> None:
        inc = self.incoming.get(d.room)
        if inc is None:
            return  # aborted or timed out already
        if not d.ok:
            await self._drop_incoming(inc, d.error or "KV transfer failed", d.code)
            return
        inc.done = d
        try:
            state = self.receiver.complete(d.room, d.payload, len(inc.task.prompt_ids))
        except Exception as e:
            log.exception("decode %d: receiving KV for %s failed", self.id, inc.task.rid)
            await self._drop_incoming(inc, f"KV transfer failed: {e}", 500)
            return
        await self._on_state(inc, state)

    async def _on_state(self, inc: Incoming, state: TransferState) -> None:
        if state is TransferState.DONE:
            await self._start(inc)
        elif state is TransferState.FAILED:
            await self._drop_incoming(inc, "KV transfer failed", 500)

    async def _start(self, inc: Incoming) -> None:
        t, d = inc.task, inc.done
        del self.incoming[t.room]
        self.kv_wait.append(time.monotonic() - inc.since)
        self.receiver.release(t.room)
        lp = None
        if d.first_logprob is not None:
            lp = TokenLogprob(d.first_token, d.first_logprob[0], [tuple(x) for x in d.first_logprob[1]])
        try:
            hidden = None
            if d.hidden:  # the prompt's hidden states, for an EAGLE drafter here
                h = torch.frombuffer(bytearray(d.hidden), dtype=getattr(torch, d.hidden_dtype))
                hidden = h.view(-1, self.core.model_config.hidden_size).to(self.core.device, self.core.loaded.dtype)
            out = self.core.add_prefilled(
                t.rid, t.prompt_ids, params_from_dict(t.params), inc.pages, d.first_token, lp, d.cached_tokens,
                prompt_hidden=hidden, hidden_start=d.hidden_start,
            )
        except Exception as e:
            # Inconsistent hidden states, or no memory for them (the drafter's copy): fail
            # this request only, and keep serving.
            if not (isinstance(e, ValueError) or is_alloc_failure(e)):
                raise
            if t.rid in self.core.requests:  # admitted before the drafter failed: its pages are the scheduler's
                self.core.abort(t.rid)
            else:
                self.core.pool.free(inc.pages)
            oom = is_alloc_failure(e)
            error = f"admitting the KV of request {t.rid} ran out of memory ({alloc_failure_detail(e)}); retry it" \
                if oom else str(e)
            log.warning("decode %d: request %s failed: %s", self.id, t.rid, error)
            await self._fail(t.rid, error, 503 if oom else 500)
            return
        if d.prompt_logprobs:  # computed by the prefill worker (scoring); the first delta carries them
            start = out.req.params.prompt_logprobs_start
            out.req.prompt_logprobs = dict(enumerate(d.prompt_logprobs, start))
        await self._emit(out)

    async def on_abort(self, a: AbortTask) -> None:
        for t in list(self.pending):
            if t.rid == a.rid:
                self.pending.remove(t)
        for inc in list(self.incoming.values()):
            if inc.task.rid == a.rid:
                self._free_incoming(inc)
        self.core.abort(a.rid)

    # ---- engine ------------------------------------------------------------------------------
    async def after_step(self, outputs: list) -> None:
        await self._emit(*outputs)

    async def _emit(self, *outputs) -> None:
        """Stream what the step produced: one TokenDeltas message for every request's new
        tokens (one send per request cost milliseconds of host time per step at 256 running
        requests), after the controller has heard of each request's first token."""
        deltas, done = [], []
        for out in outputs:
            req = out.req
            if out.error is not None:  # its step ran out of memory (or its grammar failed): the engine freed it
                log.warning("decode %d: request %s failed: %s", self.id, req.rid, out.error)
                await self._fail(req.rid, out.error, out.code, tokens_sent=bool(req.num_output))
                continue
            if out.new_token_ids and req.num_output == len(out.new_token_ids):
                # The first token is about to reach the client: from now on the request can no
                # longer be retried transparently, so the controller must know before the client.
                await self.controller.send(Streaming(req.rid, self.id))
            deltas.append(TokenDelta(
                req.rid, out.new_token_ids,
                [logprob_to_wire(lp) for lp in out.new_logprobs] if req.params.logprobs is not None else None,
                req.finish_reason if req.finished else None, req.stop_reason,
                len(req.prompt_ids), req.cached_tokens, req.num_output,
                req.prompt_logprob_list() or None if req.num_output == len(out.new_token_ids) else None,
            ))
            if req.finished:
                done.append(req.rid)
        if len(deltas) == 1:
            await self.gateway.send(deltas[0])
        elif deltas:
            await self.gateway.send(TokenDeltas(deltas))
        for rid in done:
            self.served += 1
            await self.controller.send(TaskDone(rid, self.role, self.id, True, True))

    async def tick(self) -> None:
        await self._admit()
        now = time.monotonic()
        for inc in list(self.incoming.values()):
            if inc.done is not None:
                await self._on_state(inc, self.receiver.poll(inc.task.room))
            elif now - inc.since > self.cfg.prefill_wait_s:
                # The prefill side times out the transfer itself (transfer_timeout_s after its
                # prefill); this bound covers a prefill worker that never answers at all.
                await self._drop_incoming(inc, "KV transfer timed out", 504)

    async def _drop_incoming(self, inc: Incoming, error: str, code: int) -> None:
        log.warning("decode %d: request %s failed: %s", self.id, inc.task.rid, error)
        self._free_incoming(inc)
        await self._fail(inc.task.rid, error, code)

    def _free_incoming(self, inc: Incoming) -> None:
        self.incoming.pop(inc.task.room, None)
        self.receiver.release(inc.task.room)
        self.core.pool.free(inc.pages)

    async def _fail(self, rid: str, error: str, code: int, tokens_sent: bool = False) -> None:
        # The controller forgets the request on this TaskDone (it retries only the requests of
        # workers that die), so a request failed here, out of memory or not, is not sent again.
        await self.gateway.send(RequestError(rid, error, code))
        await self.controller.send(TaskDone(rid, self.role, self.id, False, tokens_sent))

    def idle(self) -> bool:
        return not self.core.has_work and not self.pending and not self.incoming

    def idle_wait(self) -> float:
        # Poll transfers often while KV is landing; otherwise wake for heartbeats only.
        return 0.002 if self.incoming else self.cfg.heartbeat_s

    def heartbeat_extra(self) -> dict[str, int]:
        if self.receiver is None:
            return super().heartbeat_extra()
        return {"transfer_bytes": self.receiver.bytes_received, "transfer_failures": self.receiver.failures}

    def close(self) -> None:
        self.gateway.sock.close(linger=1000 if self.drain_deadline is not None else 0)  # a drain's last tokens
        super().close()
