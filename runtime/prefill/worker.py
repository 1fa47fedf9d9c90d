"""Prefill worker: computes prompts (radix-cached, chunked, batched), samples the first
token, and writes the prompt's KV pages into the decode worker's pages.

Per request: PrefillTask (from the controller) and KVDestination (from the decode worker)
may come in either order; once the prefill is done and the destination known, the
transfer starts; its completion (or failure, or timeout) is reported to the decode worker
with KVDone, and the pages are released (full pages stay in the prefix cache).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace

import torch

from runtime.config import ClusterConfig
from runtime.engine.request import Req
from runtime.messages import (
    AbortTask, KVDestination, KVDone, PrefillTask, TaskDone, logprob_to_wire, params_from_dict,
)
from runtime.transfer import TransferState, make_transfer
from runtime.worker_base import Worker

log = logging.getLogger("runtime.prefill")


@dataclass
class Job:
    task: PrefillTask
    req: Req
    dest: KVDestination | None = None
    first_token: int | None = None
    first_logprob: list | None = None
    payload: bytes = b""
    transfer_started: float | None = None
    prefilled_at: float | None = None
    prompt_logprobs: list[float] | None = None  # scoring requests only


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, cfg: ClusterConfig, worker_id: int, inbox_addr: str | None = None) -> None:
        # Prefill samples one token per request: drafting would only load a draft model.
        # An EAGLE drafter on the decode side reads the prompt's hidden states: keep them.
        engine = replace(cfg.engine, speculative="none", export_prompt_hidden=cfg.engine.speculative == "eagle")
        super().__init__(cfg, worker_id, inbox_addr or cfg.prefill_addr(worker_id), engine)
        self.sender = make_transfer(cfg.transfer, self.core.pool, worker_id, "prefill")
        self.jobs: dict[int, Job] = {}  # room -> job
        self.rooms: dict[str, int] = {}  # rid -> room
        # A decode worker may answer before our PrefillTask arrives: keep its destination.
        self.early: dict[int, tuple[float, KVDestination]] = {}
        self._fail_rng = random.Random(worker_id)
        self.handlers.update({PrefillTask: self.on_task, KVDestination: self.on_destination, AbortTask: self.on_abort})

    # ---- messages --------------------------------------------------------------------------
    async def on_task(self, t: PrefillTask) -> None:
        # Prefill produces exactly the first token; stop strings are the gateway's business.
        params = replace(params_from_dict(t.params), max_tokens=1, stop=[], n=1)
        try:
            req = self.core.add_request(t.rid, t.prompt_ids, params)
        except ValueError as e:  # bad input (a grammar that does not compile): the client's 400
            await self._fail_task(t, f"prefill rejected the request: {e}", 400)
            return
        req.hold_kv = True
        job = self.jobs[t.room] = Job(t, req)
        self.rooms[t.rid] = t.room
        early = self.early.pop(t.room, None)
        if early is not None:
            job.dest = early[1]

    async def on_destination(self, d: KVDestination) -> None:
        job = self.jobs.get(d.room)
        if job is None:
            self.early[d.room] = (time.monotonic(), d)
            return
        job.dest = d
        await self._maybe_start(job)

    async def on_abort(self, a: AbortTask) -> None:
        room = self.rooms.get(a.rid)
        if room is not None:
            self._drop(self.jobs[room])

    # ---- engine ------------------------------------------------------------------------------
    async def after_step(self, outputs: list) -> None:
        for out in outputs:
            room = self.rooms.get(out.req.rid)
            if room is None or not out.req.finished:
                continue
            job = self.jobs[room]
            if out.error is not None:  # its step ran out of memory (or its grammar failed); its pages are freed
                await self._finish(job, ok=False, error=out.error, code=out.code)
                continue
            if out.req.finish_reason == "abort" or not out.new_token_ids:
                await self._finish(job, ok=False, error="prefill failed: the KV pool cannot hold this prompt")
                continue
            job.first_token = out.new_token_ids[0]
            job.prefilled_at = time.monotonic()
            job.first_logprob = logprob_to_wire(out.new_logprobs[0] if out.new_logprobs else None)
            job.prompt_logprobs = out.req.prompt_logprob_list() if out.req.params.prompt_logprobs_start else None
            await self._maybe_start(job)

    async def _maybe_start(self, job: Job) -> None:
        if job.first_token is None or job.dest is None or job.transfer_started is not None:
            return
        job.transfer_started = time.monotonic()
        if self.cfg.fail_transfer_rate and self._fail_rng.random() < self.cfg.fail_transfer_rate:
            await self._finish(job, ok=False, error="KV transfer failed (injected failure)")
            return
        dest = dict(job.dest.transfer, pages=job.dest.pages)
        n = len(job.req.prompt_ids)
        try:
            job.payload = self.sender.start(job.task.room, job.req.pages[: len(job.dest.pages)], dest, n)
        except Exception as e:  # a backend error fails this request only
            log.exception("prefill %d: transfer of %s failed to start", self.id, job.task.rid)
            await self._finish(job, ok=False, error=f"KV transfer failed: {e}")
            return
        await self._poll(job)

    async def tick(self) -> None:
        now = time.monotonic()
        for room, (since, _) in list(self.early.items()):
            if now - since > self.cfg.transfer_timeout_s:  # its task was aborted before it came
                del self.early[room]
        for job in list(self.jobs.values()):
            if job.transfer_started is not None:
                await self._poll(job)
            elif job.prefilled_at is not None and now - job.prefilled_at > self.cfg.transfer_timeout_s:
                await self._finish(job, ok=False, error="KV transfer timed out waiting for the decode worker")

    async def _poll(self, job: Job) -> None:
        state = self.sender.poll(job.task.room)
        if state is TransferState.DONE:
            self.transfer_latency.append(time.monotonic() - job.transfer_started)
            await self._finish(job, ok=True)
        elif state is TransferState.FAILED:
            await self._finish(job, ok=False, error="KV transfer failed")
        elif time.monotonic() - job.transfer_started > self.cfg.transfer_timeout_s:
            await self._finish(job, ok=False, error="KV transfer timed out")

    async def _finish(self, job: Job, ok: bool, error: str = "", code: int = 500) -> None:
        t = job.task
        hidden, hidden_start, hidden_dtype = b"", 0, ""
        if ok and job.req.prompt_hidden:
            h = torch.cat(job.req.prompt_hidden).contiguous().cpu()
            hidden, hidden_start, hidden_dtype = h.view(torch.uint8).numpy().tobytes(), job.req.prompt_hidden_start, \
                str(h.dtype).removeprefix("torch.")
        await self.peer(t.decode_addr).send(KVDone(
            t.room, t.rid, ok, error, job.first_token if job.first_token is not None else -1,
            job.first_logprob, job.req.cached_tokens, job.payload if ok else b"", hidden, hidden_start, hidden_dtype,
            code, job.prompt_logprobs if ok else None,
        ))
        await self.controller.send(TaskDone(t.rid, self.role, self.id, ok, False))
        if ok:
            self.served += 1
        else:
            log.warning("prefill %d: request %s failed: %s", self.id, t.rid, error)
        self._drop(job)

    async def _fail_task(self, t: PrefillTask, error: str, code: int = 500) -> None:
        await self.peer(t.decode_addr).send(KVDone(t.room, t.rid, False, error, -1, None, 0, b"", code=code))
        await self.controller.send(TaskDone(t.rid, self.role, self.id, False, False))

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.task.room, None)
        self.rooms.pop(job.task.rid, None)
        self.sender.release(job.task.room)
        req = job.req
        if req in self.core.scheduler.held:
            self.core.scheduler.release_held(req)
        elif not req.finished:
            self.core.abort(req.rid)

    def idle(self) -> bool:
        return not self.jobs and not self.core.has_work

    def idle_wait(self) -> float:
        # Poll transfers in flight often (NIXL completes them asynchronously): waiting a whole
        # heartbeat here added up to heartbeat_s to every request's time to first token.
        if any(j.transfer_started is not None for j in self.jobs.values()):
            return 0.002
        return self.cfg.heartbeat_s

    def heartbeat_extra(self) -> dict[str, int]:
        return {"transfer_bytes": self.sender.bytes_sent, "transfer_failures": self.sender.failures}
