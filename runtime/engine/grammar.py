"""Grammar-constrained decoding with xgrammar: a compiled-grammar cache per engine, a
matcher per constrained request, and the batch step that masks the logits rows of the
constrained requests before sampling (greedy, sampled and speculative verify alike).

A request names at most one grammar in its SamplingParams: `json_schema` (JSON Schema
text; `{"type": "object"}` is OpenAI's json_object), `regex`, or `ebnf` (xgrammar's
EBNF/GBNF with a `root` rule). The matcher accepts each output token once, when it is
appended (EngineCore._append), so a step that is run again after an allocation failure or
a recompute after retraction never advances it twice. Everything else (checking drafts,
the bitmasks of verify rows, jump-forward) accepts tentatively and rolls back, leaving the
matcher where it was.

Compiling (the token-mask cache over the vocabulary, 10-100 ms for a JSON schema on a 49k
vocabulary) runs on a background thread: the grammar is parsed on the caller's thread (a
bad schema, regex or grammar raises there), compiled behind it, and the scheduler keeps
the request's last prompt token back until the compiled grammar is ready, so its prefill
overlaps the compile."""
from __future__ import annotations

import re
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Any

import torch

from runtime.common.sampling_params import GRAMMAR_FIELDS, SamplingParamError, SamplingParams
from runtime.engine.draft_tree import DraftTree, PendingDraft
from runtime.engine.request import Phase

if TYPE_CHECKING:
    from runtime.engine.jump_forward import JumpForward
    from runtime.engine.request import Req

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


def _children(tree: DraftTree) -> tuple[list[int], list[list[int]]]:
    roots: list[int] = []
    kids: list[list[int]] = [[] for _ in tree.parents]
    for i, p in enumerate(tree.parents):
        (roots if p < 0 else kids[p]).append(i)
    return roots, kids


class RequestGrammar:
    """One request's matcher (made once its grammar is compiled) and how many of its output
    tokens the matcher has accepted; `jump`: the tokens jump-forward decoding appends next,
    with the output length they were found at (stale once the output grows)."""

    def __init__(self, compiled: Future, param: str) -> None:
        self._compiled = compiled
        self._matcher: Any = None
        self.param = param
        self.num_accepted = 0
        self.jump: tuple[int, list[int]] | None = None

    @property
    def ready(self) -> bool:
        """Compiled: the matcher can be had without waiting (never, if the compile failed)."""
        return self._compiled.done() and self._compiled.exception() is None

    @property
    def settled(self) -> bool:
        """The compile has finished, one way or the other."""
        return self._compiled.done()

    def failure(self) -> GrammarError | None:
        """The compile's error once it failed, else None (also while it runs)."""
        if not self._compiled.done() or self._compiled.exception() is None:
            return None
        e = self._compiled.exception()
        return e if isinstance(e, GrammarError) else GrammarError(self.param, f"{self.param} does not compile: {_clean(e)}")

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            import xgrammar as xgr

            failed = self.failure()
            if failed is not None:
                raise failed
            self._matcher = xgr.GrammarMatcher(self._compiled.result())  # waits for a compile still running
        return self._matcher

    def accept(self, token: int) -> bool:
        ok = bool(self.matcher.accept_token(token))
        if ok:
            self.num_accepted += 1
        return ok

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return bool(self.matcher.is_terminated())

    def pending_jump(self, num_output: int) -> list[int] | None:
        """The jump-forward tokens found after exactly `num_output` output tokens, if any."""
        if self.jump is None or self.jump[0] != num_output:
            return None
        return self.jump[1]

    # ---- drafts and verify rows: tentative accepts, rolled back ------------------------------
    def allowed_tree(self, tree: DraftTree) -> DraftTree:
        """The nodes of `tree` the grammar allows after the accepted tokens: a node whose
        token the matcher rejects is dropped with its subtree (a chain is cut there)."""
        m = self.matcher
        if m.is_terminated():
            return DraftTree([], [])
        roots, kids = _children(tree)
        keep: list[int] = []

        def visit(i: int) -> None:
            if not m.accept_token(tree.tokens[i]):
                return
            keep.append(i)
            for c in kids[i]:
                if not m.is_terminated():
                    visit(c)
            m.rollback(1)

        for r in roots:
            visit(r)
        keep.sort()  # parents before children and siblings in their order, as DraftTree wants
        index = {-1: -1, **{old: new for new, old in enumerate(keep)}}
        return DraftTree([tree.tokens[i] for i in keep], [index[tree.parents[i]] for i in keep])

    def fill_rows(self, bitmask: torch.Tensor, row: int, tree: DraftTree | None) -> None:
        """Bitmask rows of one verify: `row` for the next token after the accepted ones,
        row + 1 + i for the token after node i of `tree` (whose nodes the grammar allows:
        allowed_tree). A row after the stop token allows everything (nothing is kept
        past a stop token)."""
        m = self.matcher
        self._fill(bitmask, row)
        if tree is None or not len(tree):
            return
        roots, kids = _children(tree)

        def visit(i: int) -> None:
            if not m.accept_token(tree.tokens[i]):
                raise ValueError(f"draft token {tree.tokens[i]} is not allowed by the {self.param}: "
                                 "drafts must pass allowed_tree first")
            self._fill(bitmask, row + 1 + i)
            for c in kids[i]:
                visit(c)
            m.rollback(1)

        for r in roots:
            visit(r)

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_terminated():
            bitmask[row].fill_(-1)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


def constrained_trees(drafts: dict, requests: dict[str, Req]) -> tuple[dict[str, DraftTree | PendingDraft], set[str]]:
    """The trees a step verifies, and the requests whose tree is a jump-forward run. Drafts
    of constrained requests keep only what their grammar allows (a PendingDraft the grammar
    allows whole stays on the device); a decoding request with jump-forward tokens pending
    verifies them instead of drafts, accepted whatever the model says (see jump_forward.py)."""
    trees: dict[str, DraftTree | PendingDraft] = {}
    for rid, d in drafts.items():
        if not d:
            continue
        req = requests.get(rid)
        g = req.grammar if req is not None else None
        tree = DraftTree.chain(d) if isinstance(d, list) else d
        if g is not None:
            host = tree.resolve() if isinstance(tree, PendingDraft) else tree
            allowed = g.allowed_tree(host)
            tree = tree if len(allowed) == len(host) else allowed
        if len(tree):
            trees[rid] = tree
    forced: set[str] = set()
    for req in requests.values():
        g = req.grammar
        jump = g.pending_jump(len(req.output_ids)) if g is not None and req.phase is Phase.DECODE else None
        if jump:
            trees[req.rid] = DraftTree.chain(jump)
            forced.add(req.rid)
    return trees, forced


def wait_compiles(compiling: list[Req], timeout: float = 0.01) -> None:
    """A step with nothing to run while grammars compile: wait a little for one instead of
    spinning the step loop against the compile thread."""
    pending = [r.grammar._compiled for r in compiling if r.grammar is not None]
    if pending:
        futures_wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)


def compile_failures(compiling: list[Req]) -> list[tuple[Req, GrammarError]]:
    """Drop from `compiling` the requests whose compile has finished and return those whose
    compile failed (to be failed with a 400)."""
    failed, still = [], []
    for r in compiling:
        g = r.grammar
        if g is None or r.finished:
            continue
        if not g.settled:
            still.append(r)
        elif g.failure() is not None:  # the scheduler held it back: nothing of it was sampled
            failed.append((r, g.failure()))
    compiling[:] = still
    return failed


def plan_jump(req: Req, jumper: JumpForward | None, max_model_len: int, max_tokens: int) -> None:
    """After req's output grew: find the tokens jump-forward appends next step (at most
    `max_tokens`, never past max_tokens or the context), if its grammar forces any."""
    g = req.grammar
    if g is None or jumper is None or req.finished or not req.output_ids or g.terminated:
        return
    room = min(max_tokens, req.params.max_tokens - len(req.output_ids), max_model_len - req.seq_len - 1)
    tokens = jumper.tokens(g.matcher, req.output_ids[-1], room)
    g.jump = (len(req.output_ids), tokens) if tokens else None


class GrammarCompiler:
    """Per engine: xgrammar's tokenizer info for the model's vocabulary (which may be larger
    than the tokenizer's: the extra ids are never allowed), an LRU of compiled grammars (as
    futures: a compile still running is shared), and the host bitmask buffer the batch masks
    are filled into."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = device
        self._compiler: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._host: torch.Tensor | None = None  # int32 [rows, ceil(V/32)] CPU (pinned on CUDA)
        self.num_compiles = 0

    def warm(self) -> None:
        """Start the compile thread and make xgrammar's tokenizer info there now, so that the
        first constrained request waits for neither (importing xgrammar alone took 0.5-1.3 s on
        a 2-core machine, and the first parse imports it on the caller's thread: a worker's
        step loop). A failure here shows again, as a GrammarError, at the first compile."""
        if self.tokenizer is not None:
            self._executor().submit(self._xgr)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        return self._pool

    def _xgr(self) -> Any:
        # Only on the compile thread (one), so it is made once.
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=8)
        return self._compiler

    @staticmethod
    def _parse(param: str, text: str) -> Any:
        import xgrammar as xgr

        try:
            if param == "json_schema":
                return xgr.Grammar.from_json_schema(text, any_whitespace=False)
            if param == "regex":
                return xgr.Grammar.from_regex(text)
            if param == "ebnf":
                return xgr.Grammar.from_ebnf(text)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(param, f"{param} does not compile: {_clean(e)}") from None
        raise ValueError(f"unknown grammar kind {param!r}")

    def _compile_parsed(self, param: str, grammar: Any) -> Any:
        try:
            compiled = self._xgr().compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(param, f"{param} does not compile: {_clean(e)}") from None
        self.num_compiles += 1
        return compiled

    def compile_async(self, param: str, text: str) -> Future:
        """The compiled grammar of (param, text) as a future, compiled once per distinct
        text on the compile thread. Parsing runs here: a bad grammar raises GrammarError now."""
        key = (param, text)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self.tokenizer is None:
            raise GrammarError(param, "this model has no tokenizer (dummy weights?): "
                               "grammar-constrained decoding needs one")
        grammar = self._parse(param, text)
        fut = self._executor().submit(self._compile_parsed, param, grammar)
        self._cache[key] = fut
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return fut

    def compile(self, param: str, text: str) -> Any:
        """The compiled grammar of (param, text), waiting for it."""
        return self.compile_async(param, text).result()

    def matcher(self, params: SamplingParams) -> RequestGrammar | None:
        """The request's grammar (None when unconstrained), compiling behind the caller.
        Raises GrammarError naming the field when the grammar does not parse."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        return RequestGrammar(self.compile_async(*spec), spec[0])

    def mask_batch(self, sampled: list, logits: torch.Tensor, trees: dict) -> None:
        """Mask, in place, the logits rows of the constrained requests among `sampled` (the
        step's ScheduledSeqs with logits, their rows in order) to what their grammar allows
        at each row, before greedy argmax, sampling or verification alike: a verified tree's
        row 1+i with the grammar's state after the path to node i, so acceptance stays
        lossless. Changes no request (a step run again after an allocation failure masks
        the same way)."""
        rows, row = [], 0
        for s in sampled:
            if s.req.grammar is not None:
                t = trees.get(s.req.rid)
                rows.append((row, s.req.grammar, t.resolve() if isinstance(t, PendingDraft) else t))
            row += s.num_logits
        self.mask_logits(logits, rows)

    @torch.inference_mode()
    def mask_logits(self, logits: torch.Tensor, rows: list[tuple[int, RequestGrammar, DraftTree | None]]) -> None:
        """Set to -inf, in place, every token the grammar forbids in the given logits rows
        (logits float [N, V] on the engine's device; rows: (first row, grammar, the verified
        tree or None), a tree's rows following its first). One bitmask fill per row (C++),
        one copy and one masking kernel per batch."""
        if not rows:
            return
        import xgrammar as xgr

        n = logits.shape[0]
        width = (self.vocab_size + 31) // 32
        if self._host is None or self._host.shape[0] < n:
            self._host = torch.empty((max(n, 16), width), dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:n]
        idx: list[int] = []
        for i, g, tree in rows:
            g.fill_rows(host, i, tree)
            idx += range(i, i + 1 + (len(tree) if tree is not None else 0))
        mask = host.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else host
        vocab = min(self.vocab_size, logits.shape[-1])
        if logits.is_contiguous():
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=idx)
            return
        # xgrammar's kernels index rows as contiguous (the CPU logits are a transposed GEMM
        # result): mask a contiguous copy of the constrained rows and write them back.
        pick = torch.tensor(idx, dtype=torch.int64).to(logits.device)
        sub = logits.index_select(0, pick)
        xgr.apply_token_bitmask_inplace(sub, mask.index_select(0, pick), vocab_size=vocab)
        logits.index_copy_(0, pick, sub)
