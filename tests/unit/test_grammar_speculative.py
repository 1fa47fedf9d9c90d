"""Grammars with speculation, jump-forward decoding and the background compile: drafts of
constrained requests are cut to what the grammar allows and every verify row is masked at
its node, so constrained greedy outputs equal speculation off (n-gram, EAGLE chains and
trees, mixed with free requests); jump-forward appends the forced text in far fewer
forwards and its outputs still validate; with it off, outputs equal an independent
token-by-token reference (transformers + xgrammar); a request whose grammar is still
compiling prefills all but its last token and waits."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import jsonschema
import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.speculative.eagle_head import EagleHead, save_head
from runtime.engine import grammar as grammar_mod
from runtime.engine.draft_tree import DraftTree
from runtime.engine.weights import reference_hf_model
from tests.unit.test_grammar_engine import KW, PROMPTS, SCHEMA, check_valid, run_mixed

# Long fixed keys: most of the output is forced text.
LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_identification_number": {"type": "integer", "minimum": 0, "maximum": 99},
        "customer_preferred_contact_method": {"enum": ["email", "phone"]},
        "customer_account_is_active": {"type": "boolean"},
    },
    "required": ["customer_identification_number", "customer_preferred_contact_method", "customer_account_is_active"],
    "additionalProperties": False,
}


def constrained_steps_saved(reqs: list) -> int:
    """Tokens the constrained requests gained beyond one per decode step."""
    return sum(len(r.output_ids) - 1 - r.num_steps for r in reqs[:4])


@pytest.fixture(scope="module")
def random_head(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    engine = Engine(tiny_model_dir, **KW)
    path = str(tmp_path_factory.mktemp("grammar-eagle") / "h")
    save_head(path, EagleHead.for_target(engine.core.loaded.model).eval(), {"target_model": "tiny"})
    return path


@pytest.mark.parametrize("method,tree,jump", [("ngram", "chain", False), ("ngram", "chain", True),
                                              ("eagle", "chain", False), ("eagle", "chain", True),
                                              ("eagle", "4x12", False)])
def test_speculation_keeps_constrained_greedy_outputs(tiny_model_dir: str, random_head: str, method: str, tree: str,
                                                      jump: bool) -> None:
    extra = dict(draft_model=random_head, speculative_tree=tree) if method == "eagle" else {}
    base = Engine(tiny_model_dir, **KW, jump_forward=jump)
    spec = Engine(tiny_model_dir, **KW, jump_forward=jump, speculative=method, num_draft_tokens=4,
                  speculative_policy="fixed", **extra)
    drafted: set[str] = set()
    propose = spec.core.drafter.propose

    def record(reqs, k):
        out = propose(reqs, k)
        drafted.update(rid for rid, d in out.items() if len(d))
        return out

    spec.core.drafter.propose = record
    ref = run_mixed(base, 0.0)
    got = run_mixed(spec, 0.0)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    check_valid(spec, got)
    assert {"r0", "r1", "r2", "r3"} & drafted  # constrained requests drafted, next to free ones
    if method == "ngram" and not jump:
        assert constrained_steps_saved(got) > 0  # and some of their drafts were accepted
    if method == "eagle":
        assert not spec.core.drafter.states
        spec.core.drafter.pool.check_no_leak(0)
    spec.shutdown()
    spec.core.pool.check_no_leak(0)


def test_sampled_constrained_outputs_with_speculation_are_valid(tiny_model_dir: str) -> None:
    spec = Engine(tiny_model_dir, **KW, speculative="ngram", num_draft_tokens=4, speculative_policy="fixed")
    check_valid(spec, run_mixed(spec, 1.0, seed=3))


def test_allowed_tree_cuts_rejected_nodes_and_leaves_the_matcher(tiny_model_dir: str) -> None:
    engine = Engine(tiny_model_dir, **KW)
    tok = engine.tokenizer
    g = engine.core.grammars.matcher(SamplingParams(regex=r"ab(c|d)e"))
    a, b, c, d, e, x = (tok.convert_tokens_to_ids(ch) for ch in "abcdex")
    assert g.accept(a)
    # root children: b (ok) and x (rejected, with its child); under b: c, x, d; under c: e, then x.
    tree = DraftTree([b, x, c, x, d, a, e, x], [-1, -1, 0, 0, 0, 1, 2, 6])
    width = (engine.core.model_config.vocab_size + 31) // 32
    before = torch.zeros((1, width), dtype=torch.int32)
    g.matcher.fill_next_token_bitmask(before, 0)
    allowed = g.allowed_tree(tree)
    assert (allowed.tokens, allowed.parents) == ([b, c, d, e], [-1, 0, 0, 1])
    assert g.allowed_tree(DraftTree.chain([b, c, x, e])).tokens == [b, c]  # a chain is cut at the first reject
    rows = torch.zeros((1 + len(allowed), width), dtype=torch.int32)
    g.fill_rows(rows, 0, allowed)
    assert torch.equal(rows[0], before[0])  # the matcher is back where it was
    allows = lambda row, t: bool((int(rows[row, t // 32]) >> (t % 32)) & 1)  # noqa: E731
    assert allows(0, b) and not allows(0, c)  # after "a": b only
    assert allows(1, c) and allows(1, d) and not allows(1, e)  # after "ab": c or d
    assert allows(2, e) and allows(3, e) and not allows(2, c)  # after "abc" / "abd": e
    assert allows(4, 2) and not allows(4, e)  # after "abce": the stop token only
    assert g.num_accepted == 1 and g.accept(b)


def test_jump_forward_fewer_forwards_and_valid(tiny_model_dir: str) -> None:
    params = SamplingParams(max_tokens=150, temperature=0.0, json_schema=json.dumps(LONG_KEYS))
    prompts = PROMPTS[:3]
    runs = {}
    for jump in (True, False):
        engine = Engine(tiny_model_dir, **KW, jump_forward=jump)
        before = engine.core.num_forwards
        res = engine.generate(prompts, params)
        runs[jump] = (engine.core.num_forwards - before, res)
        for r in res:
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(r.text), LONG_KEYS)
        engine.core.scheduler.check_no_leak()
    (on, res_on), (off, _) = runs[True], runs[False]
    assert on * 3 < off, (on, off)
    assert all(r.accept_length > 2.0 for r in res_on)  # most tokens came from jumps
    # One at a time (batch 1) too, with streaming: the text streamed equals the result's.
    engine = Engine(tiny_model_dir, **KW)
    text = "".join(engine.stream(PROMPTS[0], params))
    assert text == engine.generate(PROMPTS[0], params)[0].text
    assert engine.core.jumper.num_jumps > 0


def test_jump_forward_counts_toward_max_tokens_and_gives_logprobs(tiny_model_dir: str) -> None:
    engine = Engine(tiny_model_dir, **KW)
    params = SamplingParams(max_tokens=9, temperature=0.0, logprobs=2, json_schema=json.dumps(LONG_KEYS))
    r = engine.generate(PROMPTS[0], params)[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 9
    assert r.accept_length > 1.0  # a jump happened within the 9 tokens
    assert [lp.token_id for lp in r.logprobs] == r.token_ids
    assert all(lp.logprob <= 0.0 and len(lp.top) == 2 for lp in r.logprobs)
    engine.core.scheduler.check_no_leak()


def test_jump_forward_off_equals_a_token_by_token_reference(tiny_model_dir: str) -> None:
    """transformers' logits, xgrammar's mask, argmax, one token at a time: the engine
    with jump-forward off gives the same tokens (and with it on, the same text start up
    to the first jump, which only changes token boundaries)."""
    import xgrammar as xgr

    engine = Engine(tiny_model_dir, **KW, jump_forward=False)
    tok = engine.tokenizer
    schema = json.dumps(SCHEMA)
    params = SamplingParams(max_tokens=40, temperature=0.0, json_schema=schema)
    got = engine.generate(PROMPTS[1], params)[0].token_ids
    hf = reference_hf_model(tiny_model_dir)
    vocab = engine.core.model_config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[2])
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False))
    ids, out = list(tok(PROMPTS[1])["input_ids"]), []
    mask = xgr.allocate_token_bitmask(1, vocab)
    with torch.no_grad():
        while len(out) < 40 and not m.is_terminated():
            logits = hf(torch.tensor([ids + out])).logits[:, -1].float().contiguous()
            m.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            t = int(logits.argmax())
            assert m.accept_token(t)
            out.append(t)
    assert got == out


def test_prefill_overlaps_the_compile(tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(tiny_model_dir, **KW)
    core = engine.core
    gate = threading.Event()
    compile_parsed = core.grammars._compile_parsed

    def slow(param, grammar):
        assert gate.wait(30)
        return compile_parsed(param, grammar)

    monkeypatch.setattr(core.grammars, "_compile_parsed", slow)
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    params = SamplingParams(max_tokens=60, temperature=0.0, json_schema=json.dumps(SCHEMA))
    req = core.add_request("c", ids, params)  # returns at once, the compile still running
    free = core.add_request("f", ids, SamplingParams(max_tokens=3, temperature=0.0))
    for _ in range(4):
        core.step()
    assert not req.output_ids and req.num_computed == len(ids) - 1  # prefilled but the last token
    assert free.finished  # the free request did not wait
    gate.set()
    while core.has_work:
        core.step()
    assert req.finish_reason == "stop"
    jsonschema.validate(json.loads(engine.tokenizer.decode(req.output_ids, skip_special_tokens=True)), SCHEMA)
    assert not core.compiling
    core.scheduler.check_no_leak()


def test_a_failed_background_compile_is_a_400_step_output(tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(tiny_model_dir, **KW)
    core = engine.core

    def fail(param, grammar):
        raise grammar_mod.GrammarError(param, f"{param} does not compile: injected")

    monkeypatch.setattr(core.grammars, "_compile_parsed", fail)
    req = core.add_request("c", engine.tokenizer(PROMPTS[0])["input_ids"],
                           SamplingParams(max_tokens=8, regex="[a-z]+"))
    outs = []
    for _ in range(50):
        outs += core.step()
        if req.finished:
            break
    failed = [o for o in outs if o.error is not None]
    assert len(failed) == 1 and failed[0].code == 400 and "injected" in failed[0].error
    assert req.finish_reason == "error" and not core.requests
    core.scheduler.check_no_leak()
    with pytest.raises(ValueError):  # a grammar that does not parse still raises at once
        core.add_request("bad", [5, 6], replace(req.params, regex="a(b"))
