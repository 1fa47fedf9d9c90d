"""Grammar-constrained decoding with xgrammar: a compiled-grammar cache per engine, a
matcher per constrained request, and the batch step that masks the logits rows of the
constrained requests before sampling (greedy, sampled and speculative verify alike).

A request names at most one grammar in its SamplingParams: `json_schema` (JSON Schema
text; `{"type": "object"}` is OpenAI's json_object), `regex`, or `ebnf` (xgrammar's
EBNF/GBNF with a `root` rule). The matcher accepts each output token once, when it is
appended (EngineCore._append), so a step that is run again after an allocation failure or
a recompute after retraction never advances it twice."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch

from runtime.engine.sampling_params import GRAMMAR_FIELDS, SamplingParamError, SamplingParams

# Compiled grammars kept per engine; a compiled JSON schema is small (the tiny test
# vocabulary: KBs; a 49k vocabulary: a few hundred KB at most, mostly the adaptive mask cache).
MAX_CACHED_GRAMMARS = 256
# JSON is written in one layout (xgrammar's: ", " and ": " separators, no newlines): free
# whitespace lets a weak model spend its whole max_tokens on blanks between tokens.


class GrammarError(SamplingParamError):
    """A grammar that does not compile (or a model that cannot be constrained): bad input,
    reported as a 400 naming `param` (json_schema, regex or ebnf)."""


def grammar_spec(params: SamplingParams) -> tuple[str, str] | None:
    """(field, text) of the request's grammar, or None when it is unconstrained."""
    for name in GRAMMAR_FIELDS:
        text = getattr(params, name)
        if text is not None:
            return name, text
    return None


def _clean(e: BaseException) -> str:
    """xgrammar's error text without its C++ log prefix ('[18:49:23] /project/cpp/x.cc:94: ')."""
    msg = " ".join(str(e).split())
    msg = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", msg)
    msg = msg.replace("Check failed: (error.empty()) is false: ", "")
    return msg[:300] or type(e).__name__


class RequestGrammar:
    """One request's matcher and how many of its output tokens the matcher has accepted."""

    def __init__(self, matcher: Any, param: str) -> None:
        self.matcher = matcher
        self.param = param
        self.num_accepted = 0

    def accept(self, token: int) -> bool:
        ok = bool(self.matcher.accept_token(token))
        if ok:
            self.num_accepted += 1
        return ok

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return bool(self.matcher.is_terminated())


class GrammarCompiler:
    """Per engine: xgrammar's tokenizer info for the model's vocabulary (which may be larger
    than the tokenizer's: the extra ids are never allowed), an LRU of compiled grammars, and
    the host bitmask buffer the batch masks are filled into."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = device
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._host: torch.Tensor | None = None  # int32 [rows, ceil(V/32)] CPU (pinned on CUDA)
        self.num_compiles = 0

    def _xgr(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            if self.tokenizer is None:
                raise GrammarError("json_schema", "this model has no tokenizer (dummy weights?): "
                                   "grammar-constrained decoding needs one")
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=8)
        return self._compiler

    def compile(self, param: str, text: str) -> Any:
        """The compiled grammar of (param, text), compiled once per distinct text."""
        key = (param, text)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        compiler = self._xgr()
        try:
            if param == "json_schema":
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            elif param == "regex":
                compiled = compiler.compile_regex(text)
            elif param == "ebnf":
                compiled = compiler.compile_grammar(text)
            else:
                raise ValueError(f"unknown grammar kind {param!r}")
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(param, f"{param} does not compile: {_clean(e)}") from None
        self.num_compiles += 1
        self._cache[key] = compiled
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: SamplingParams) -> RequestGrammar | None:
        """A fresh matcher for the request's grammar (None when unconstrained). Raises
        GrammarError naming the field when the grammar does not compile."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        import xgrammar as xgr

        return RequestGrammar(xgr.GrammarMatcher(self.compile(*spec)), spec[0])

    @torch.inference_mode()
    def mask_logits(self, logits: torch.Tensor, rows: list[tuple[int, RequestGrammar]]) -> None:
        """Set to -inf, in place, every token the grammar forbids next in the given logits
        rows (logits float [N, V] on the engine's device; rows: (row index, grammar)). One
        bitmask fill per constrained row (C++), one copy and one masking kernel per batch."""
        if not rows:
            return
        import xgrammar as xgr

        n = logits.shape[0]
        width = (self.vocab_size + 31) // 32
        if self._host is None or self._host.shape[0] < n:
            self._host = torch.empty((max(n, 16), width), dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:n]
        for i, g in rows:
            g.matcher.fill_next_token_bitmask(host, i)
        mask = host.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else host
        vocab = min(self.vocab_size, logits.shape[-1])
        idx = [i for i, _ in rows]
        if logits.is_contiguous():
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=idx)
            return
        # xgrammar's kernels index rows as contiguous (the CPU logits are a transposed GEMM
        # result): mask a contiguous copy of the constrained rows and write them back.
        pick = torch.tensor(idx, dtype=torch.int64).to(logits.device)
        sub = logits.index_select(0, pick)
        xgr.apply_token_bitmask_inplace(sub, mask.index_select(0, pick), vocab_size=vocab)
        logits.index_copy_(0, pick, sub)
