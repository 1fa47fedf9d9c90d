"""Allocation failures a step survives (EngineCore.step): what counts as one, which of the
step's requests it fails, what the client is told of it, and the test-only hook that
injects them (RUNTIME_TEST_FAIL_ALLOC)."""
from __future__ import annotations

import functools
import re

import torch

from runtime.engine.kv_pool import OutOfPages
from runtime.engine.request import Phase, Req
from runtime.env import ENV

# RuntimeErrors whose message says an allocation failed: torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory", "not enough memory"), CUDA libraries and
# kernels that report cudaErrorMemoryAllocation as text. Any other RuntimeError is a bug
# and must still crash the step loudly.
_ALLOC_FAILURE_TEXT = ("out of memory", "can't allocate memory", "not enough memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_alloc_failure(e: BaseException) -> bool:
    """Whether `e` is an allocation failure a step survives (see EngineCore.step)."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, OutOfPages)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _ALLOC_FAILURE_TEXT)


def step_victims(seqs: list, rerun_decode: bool) -> list[Req]:
    """The requests a step of `seqs` (ScheduledSeqs) that ran out of memory fails.

    With `rerun_decode` (the failure came before anything of the step was applied) the step
    is halved: requests fail until what is left of it is at most half its new tokens,
    prefill chunks first, biggest first, then decode rows, newest first (as the scheduler
    retracts). A decode row is one token (a few with drafts), a prefill chunk up to
    max_batch_tokens, and activations and logits grow with the tokens, so the big chunks are
    what made the step too big; a small prompt that happened to share their step is not
    failed with them. The rest are left exactly as they were and run again next step:
    num_computed did not move, and whatever KV this forward wrote at their new positions the
    rerun writes again (same tokens, same positions) before anything reads it; sampling is
    seeded by position, so the rerun gives the tokens a step that never failed would have
    (their drafter state starts over, which costs acceptance, not tokens). Without
    `rerun_decode` (the failure came while applying the results) every request not yet
    applied fails, as its state may be half updated. Either way every failed step ends at
    least one request, so repeated failures cannot loop."""
    if not rerun_decode:
        return [s.req for s in seqs if not s.req.finished]
    order = sorted((s for s in seqs if s.req.phase is not Phase.DECODE), key=lambda s: -s.q_len)
    order += sorted((s for s in seqs if s.req.phase is Phase.DECODE), key=lambda s: -s.req.arrival)
    total = left = sum(s.q_len for s in seqs)
    victims: list[Req] = []
    for s in order:
        if victims and 2 * left <= total:
            break
        victims.append(s.req)
        left -= s.q_len
    return victims


def alloc_failure_detail(e: BaseException) -> str:
    """What the client is told of an allocation failure: the size asked for ("tried to
    allocate 8.12 GiB", CUDA's and the CPU allocator's wording), else the message's start.
    The per-process memory breakdown CUDA appends is for the log, not the client."""
    m = re.search(r"tried to allocate ([0-9.]+ ?[A-Za-z]+)", str(e), re.IGNORECASE)
    return f"tried to allocate {m.group(1)}" if m else (" ".join(str(e).split()) or type(e).__name__)[:200]


@functools.lru_cache(maxsize=8)
def _injected_failures(spec: str) -> tuple[frozenset[int], int | None]:
    """RUNTIME_TEST_FAIL_ALLOC parsed: (forward numbers that fail, token threshold or None)."""
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "steps":
            return frozenset(int(x) for x in arg.split(",") if x.strip()), None
        if kind == "tokens":
            return frozenset(), int(arg)
    except ValueError:
        pass
    raise ValueError(f"RUNTIME_TEST_FAIL_ALLOC must be 'steps:N[,N...]' or 'tokens:N' (got {spec!r})")


def maybe_inject_alloc_failure(num_forwards: int, num_tokens: int) -> None:
    """TEST ONLY (RUNTIME_TEST_FAIL_ALLOC): fail the engine's forward number `num_forwards` (of
    `num_tokens` new tokens) as CUDA would when its logits or activations do not fit. Called
    after the forward, so the KV of the new tokens was written, as a real failure late in the
    forward leaves it."""
    spec = ENV.test_fail_alloc
    if not spec:
        return
    steps, max_tokens = _injected_failures(spec)
    if num_forwards in steps or (max_tokens is not None and num_tokens > max_tokens):
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 8.12 GiB. (injected by RUNTIME_TEST_FAIL_ALLOC={spec!r} "
            f"in forward {num_forwards} of {num_tokens} new tokens)")
