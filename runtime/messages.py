"""Typed messages, grouped by link. Token ids are plain int lists; KV bytes are `bytes`.

SamplingParams travel as a dict of their fields (`params_to_dict` / `params_from_dict`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from runtime.common.logprobs import TokenLogprob
from runtime.common.sampling_params import SamplingParams
from runtime.ipc import message


def params_to_dict(p: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(p)


def params_from_dict(d: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**d)


# ---- gateway -> controller -------------------------------------------------------------
@message
class Generate:
    rid: str
    prompt_ids: list[int]
    params: dict[str, Any]


@message
class Abort:
    rid: str


# ---- controller -> prefill worker / decode worker -------------------------------------
@message
class PrefillTask:
    rid: str
    room: int  # transfer id shared by the prefill and the decode side
    prompt_ids: list[int]
    params: dict[str, Any]
    decode_id: int
    decode_addr: str  # where KVDone goes


@message
class DecodeTask:
    rid: str
    room: int
    prompt_ids: list[int]
    params: dict[str, Any]
    prefill_id: int
    prefill_addr: str  # where KVDestination goes


@message
class GenerateTask:
    """A whole request for a colocated decode worker (`--prefill 0`): it prefills the
    prompt itself, in its own prefix cache, then decodes; no KV moves."""

    rid: str
    prompt_ids: list[int]
    params: dict[str, Any]


@message
class AbortTask:
    rid: str


# ---- decode worker <-> prefill worker (the KV transfer handshake) -----------------------
@message
class KVDestination:
    room: int
    rid: str
    decode_id: int
    pages: list[int]  # decode-side page ids, one per page of the prompt
    transfer: dict[str, Any]  # backend-specific: NIXL agent name/metadata/base addresses


@message
class KVDone:
    room: int
    rid: str
    ok: bool
    error: str
    first_token: int
    first_logprob: list[Any] | None  # [logprob, [[id, logprob], ...]] when asked
    cached_tokens: int
    payload: bytes  # inline KV (the zmq transfer backend); b"" when written by NIXL
    # What an EAGLE drafter on the decode side needs of the prompt: the target's final hidden
    # states of prompt positions hidden_start .. L-1 (row-major [n, H], dtype `hidden_dtype`);
    # b"" when the decode side does not draft with EAGLE.
    hidden: bytes = b""
    hidden_start: int = 0
    hidden_dtype: str = ""
    code: int = 500  # when not ok: the HTTP status for the client (503: the prefill step ran out of memory)
    # With params' prompt_logprobs_start: the logprob of each prompt token from there to the
    # prompt's end (scoring, runtime/engine/prompt_logprobs.py); None otherwise.
    prompt_logprobs: list[float] | None = None


def logprob_to_wire(lp: TokenLogprob | None) -> list | None:
    """A sampled token's logprob as TokenDelta / KVDone carry it: [logprob, [[id, logprob], ...]]."""
    return None if lp is None else [lp.logprob, [list(t) for t in lp.top]]


# ---- decode worker -> gateway ------------------------------------------------------------
@message
class TokenDelta:
    rid: str
    token_ids: list[int]
    logprobs: list[Any] | None  # per token: [logprob, [[id, logprob], ...]]
    finish_reason: str | None  # None while running
    stop_reason: int | str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # Scoring: the prompt logprobs (see KVDone), on the request's first delta only.
    prompt_logprobs: list[float] | None = None


@message
class TokenDeltas:
    """Every TokenDelta of one engine step, in one message: at 256 running requests one
    send per request cost the decode worker milliseconds of host time per step."""

    deltas: list[TokenDelta]


@message
class RequestError:
    rid: str
    message: str
    # HTTP status the gateway should answer with: 400 bad input, 503 retry later (no live
    # worker; the request's engine step ran out of memory), 504 timeout, 500 the rest.
    code: int


# ---- workers -> controller ---------------------------------------------------------------
@message
class Ready:
    role: str  # "prefill" | "decode"
    id: int
    pid: int
    kv_total_pages: int
    device: str  # where the engine runs, as the host names it: "cpu", "cuda:3" (physical index)


@message
class Heartbeat:
    role: str
    id: int
    pid: int
    running: int
    queued: int
    served: int
    kv_free_pages: int
    kv_total_pages: int
    cache_hit_rate: float
    transfer_bytes: int
    transfer_failures: int
    # Samples since the previous heartbeat: KV transfer latencies (s, prefill side: write
    # posted -> completed), KV waits (s, decode side: pages reserved -> KV landed, so the
    # prefill queue and compute included) and tokens gained per speculative decode step
    # (bonus token included), by drafter.
    transfer_latency: list[float]
    kv_wait: list[float]
    drafter: str
    accept_lengths: list[int]


@message
class TaskDone:
    """A worker is finished with a request (success or failure): the controller's in-flight
    table forgets it on that worker."""

    rid: str
    role: str
    id: int
    ok: bool
    tokens_sent: bool  # some token already reached the client (no transparent retry)


# ---- controller -> gateway ---------------------------------------------------------------
@message
class ClusterStatus:
    workers: list[dict[str, Any]]  # the /health "workers" entries
    metrics: dict[str, Any]


@message
class Shutdown:
    reason: str


@message
class Streaming:
    """decode worker -> controller: the first token of rid went to the client, so the
    request can no longer be retried transparently."""

    rid: str
    decode_id: int


# ---- worker <-> controller: joining over tcp:// (runtime worker; controller/registry.py) ----
@message
class Register:
    """A worker that started on its own asks to join; sent again every few seconds until
    answered (the controller may start later). `nonce` makes a repeated Register one worker."""

    nonce: str
    role: str  # "prefill" | "decode"
    addr: str  # the worker's inbox as its peers reach it: tcp://HOST:PORT
    pid: int
    host: str
    device: str
    fingerprint: dict[str, Any]  # runtime.fingerprint.model_fingerprint
    kv_layout: dict[str, Any]  # runtime.transfer.base.kv_layout of its pool (dtype as resolved)
    transfer: str  # the KV transfer backend it built: "zmq" | "nixl"
    kv_total_pages: int


@message
class Registered:
    """controller -> worker: admitted under this id; it reports Ready next."""

    id: int


@message
class Refused:
    """controller -> worker: not admitted (another model, KV layout or transfer backend)."""

    reason: str


@message
class Drain:
    """worker -> controller: SIGTERM; route nothing new here."""

    role: str
    id: int
    pid: int


@message
class DrainAck:
    """controller -> worker: every task routed to it was sent before this message."""


@message
class Deregister:
    """worker -> controller: leaving now (drained, or the drain timed out)."""

    role: str
    id: int
    pid: int
