"""A request's state inside one engine: tokens, KV pages, sampling and stop bookkeeping."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from runtime.common.logprobs import TokenLogprob
from runtime.common.sampling_params import SamplingParams
from runtime.engine.page_table import PageList


class Phase(enum.Enum):
    WAITING = "waiting"  # no KV pages (new, or retracted and waiting to be recomputed)
    PREFILL = "prefill"  # some prompt tokens still to compute (chunked prefill)
    DECODE = "decode"  # every token but the last has its KV in the cache
    FINISHED = "finished"


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int  # admission order; later arrivals are retracted first
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    # KV: pages[i] holds positions [i*page_size, (i+1)*page_size); num_computed tokens are written.
    # A PageList (it counts changes other than appending: the graphs' page table relies on it).
    pages: PageList = field(default_factory=PageList)
    num_computed: int = 0
    # Overlap schedule (engine/overlap.py): trailing entries of output_ids that are still
    # placeholders for tokens the step in flight samples (negative ids).
    num_pending: int = 0
    # Prefix-cache bookkeeping: the locked node and how many leading tokens' pages the cache owns.
    cache_node: Any = None
    num_cache_owned: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_steps: int = 0  # decode forward passes that produced tokens for this request
    # Of those, the steps the speculation policy drafted in, and the tokens they gained this
    # request (its own accept length under drafting, what the policy weighs near the end of a batch).
    draft_steps: int = 0
    draft_tokens: int = 0
    num_retractions: int = 0
    # Prefill workers keep a finished request's pages until its KV has been sent.
    hold_kv: bool = False
    # With EngineConfig.export_prompt_hidden: the final hidden states of the prompt positions
    # computed here (chunks, consecutive from prompt_hidden_start), for a decode worker's drafter.
    prompt_hidden: list[Any] = field(default_factory=list)
    prompt_hidden_start: int = 0
    # The grammar matcher of a constrained request (runtime.engine.grammar.RequestGrammar):
    # it has accepted exactly output_ids; None when unconstrained or finished.
    grammar: Any = None
    # With params.prompt_logprobs_start: position -> logprob of the prompt token there, given
    # the tokens before it (filled by the prefill chunks that compute those positions).
    prompt_logprobs: dict[int, float] = field(default_factory=dict)

    def keep_prompt_hidden(self, start: int, chunk: Any) -> None:
        """Add the hidden states of positions start..start+len(chunk)-1; a chunk that does
        not continue the kept ones (a recompute after retraction) starts over."""
        if not self.prompt_hidden or self.prompt_hidden_start + sum(len(c) for c in self.prompt_hidden) != start:
            self.prompt_hidden, self.prompt_hidden_start = [], start
        self.prompt_hidden.append(chunk)

    def prompt_logprob_list(self) -> list[float]:
        """The prompt logprobs from params.prompt_logprobs_start to the prompt's end, in order."""
        start = self.params.prompt_logprobs_start
        if start is None:
            return []
        return [self.prompt_logprobs[p] for p in range(start, len(self.prompt_ids))]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a prompt-long copy per call)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    @property
    def num_output(self) -> int:
        """Output tokens known to the host (placeholders of a step in flight not counted)."""
        return len(self.output_ids) - self.num_pending

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def accept_length(self) -> float:
        """Mean tokens gained per decode step (1.0 without speculation)."""
        decode_tokens = max(0, len(self.output_ids) - 1)  # the first token comes from prefill
        return decode_tokens / self.num_steps if self.num_steps else 1.0
