"""EAGLE drafting: a saved head loads back unchanged; the head's paged serving path equals
its dense training path and the training-time chain simulation; the features the engine
hands to the drafter are transformers' last_hidden_state; `runtime train-draft` produces
a head that keeps greedy outputs identical, leaks no page (target or head pool), and whose
drafts are accepted on text it was trained on."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.speculative import eagle, simulate, train_draft
from runtime.engine.speculative.base import DraftTree
from runtime.engine.speculative.eagle import EagleDrafter
from runtime.engine.speculative.eagle_head import CONFIG_FILE, WEIGHTS_FILE, EagleHead, load_head, save_head
from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention
from runtime.engine.kv_pool import KVPool
from runtime.engine.model import ForwardContext
from runtime.engine.request import Req
from runtime.engine.weights import LoadedModel, load_model, reference_hf_model
from tests.unit.test_engine import PROMPTS
from tests.unit.test_spec_policy import Intermittent

# Overfit a head on the tiny model's own greedy continuations of 4 prompts (1 held out).
TRAIN_ARGS = ["--num-prompts", "5", "--max-new-tokens", "24", "--temperature", "0", "--epochs", "60",
              "--batch-size", "4", "--lr", "5e-3", "--token-weight", "1.0", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> LoadedModel:
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


def random_head(lm: LoadedModel, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead.for_target(lm.model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return head.eval()


def test_save_load_round_trip(tiny: LoadedModel, tmp_path) -> None:
    head = random_head(tiny)
    save_head(str(tmp_path / "h"), head, {"target_model": "tiny", "metrics": {"val_top1": 0.5}})
    assert sorted(os.listdir(tmp_path / "h")) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    back = load_head(str(tmp_path / "h"), tiny.config, "cpu", torch.float32)
    assert back.meta["target_model"] == "tiny" and back.meta["metrics"] == {"val_top1": 0.5}
    want, got = head.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert back.draft_ids is None and back.meta["draft_vocab_size"] is None
    head.draft_ids = torch.tensor([3, 9, 200])
    save_head(str(tmp_path / "v"), head, {})
    assert torch.equal(load_head(str(tmp_path / "v"), tiny.config, "cpu", torch.float32).draft_ids, head.draft_ids)
    head.draft_ids = torch.tensor([3, 512])  # past the target's vocabulary
    save_head(str(tmp_path / "bad"), head, {})
    with pytest.raises(ValueError, match="draft_ids must be token ids"):
        load_head(str(tmp_path / "bad"), tiny.config, "cpu", torch.float32)
    head.draft_ids = None
    emb, feat = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    pos = torch.arange(5).repeat(2, 1) + 7
    torch.testing.assert_close(back.forward_dense(emb, feat, pos), head.forward_dense(emb, feat, pos), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained for a target with hidden_size=64"):
        load_head(str(tmp_path / "h"), replace(tiny.config, hidden_size=128), "cpu", torch.float32)
    with pytest.raises(FileNotFoundError, match="train-draft"):
        load_head(str(tmp_path), tiny.config, "cpu", torch.float32)


def test_paged_head_matches_dense(tiny: LoadedModel) -> None:
    """Serving (paged KV, catch-up of several pairs then one pair per step) computes what
    training (dense causal attention) computes."""
    head = random_head(tiny, seed=1)
    n, ps = 11, 4
    emb, feat = torch.randn(n, 64), torch.randn(n, 64)
    pos = torch.arange(n) + 5
    dense = head.forward_dense(emb[None], feat[None], pos[None])[0]
    pool = KVPool(1, 5, ps, head.cfg.num_kv_heads, head.cfg.head_dim, torch.float32, "cpu")
    pages = pool.alloc(-(-n // ps))
    attn, rows, done = TorchAttention(), [], 0
    for q in (6, 1, 3, 1):
        meta = AttentionMetadata.build([q], [done + q], [pages], ps, torch.device("cpu"))
        attn.prepare(meta)
        slots = torch.tensor([pages[i // ps] * ps + i % ps for i in range(done, done + q)])
        with torch.no_grad():
            rows.append(head(emb[done : done + q], feat[done : done + q], pos[done : done + q], ForwardContext(pool, attn, slots)))
        done += q
    torch.testing.assert_close(torch.cat(rows), dense, rtol=1e-5, atol=1e-5)


def feed_and_compare(drafter: EagleDrafter, tree: tuple[int, int] | None, prompt_chunks: tuple[int, ...],
                     gen_chunks: tuple[int, ...], k: int, seed: int, cached: int = 0) -> None:
    """Deliver a sequence's pairs as the engine does (prompt chunks through observe_prompt,
    the first `cached` prompt positions skipped as a prefix-cache hit skips them, then
    accepted runs through observe), proposing after each run; every proposal must equal
    simulate.draft_trees at that pair (with the same context). Runs on the drafter's device."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len, n_gen = cached + sum(prompt_chunks), sum(gen_chunks)
    seq = torch.randint(3, 512, (prompt_len + n_gen,), generator=gen)
    feats = torch.randn(prompt_len + n_gen, 64, generator=gen).to(drafter.device, drafter.dtype)  # f_0 .. f_{n-1}
    sample = train_draft.Sample(seq[1:], feats, prompt_len)
    with torch.no_grad():
        batch = train_draft.collate([sample], drafter.device, [cached])
        want_tok, want_par = simulate.draft_trees(drafter.head, drafter.target, batch, k, *(tree or (1, 0)))
    req = Req(rid="r", prompt_ids=seq[:prompt_len].tolist(), params=SamplingParams(), seed=0, arrival=0)
    start = cached
    for q in prompt_chunks:
        drafter.observe_prompt(req, start, feats[start : start + q])
        start += q
    fed = 0
    for chunk in gen_chunks:
        pos = prompt_len + fed
        drafter.observe(req, seq[pos : pos + chunk].tolist(), feats[pos - 1 : pos - 1 + chunk])
        req.output_ids += seq[pos : pos + chunk].tolist()
        fed += chunk
        pending = drafter.propose([req], k)["r"]
        got = pending.resolve()
        t = prompt_len + fed - 2 - cached  # the pair index of the newest token
        if tree is None:
            assert pending.is_chain and got.tokens == want_tok[0, t].tolist()
        else:
            assert len(got) == tree[1]
            assert (got.tokens, got.parents) == (want_tok[0, t].tolist(), want_par[0, t].tolist())
            # What the verify step takes from the device instead of the host tree.
            d = pending.drafts
            assert d.depths[0].tolist() == got.depths() and d.bits[0].tolist() == got.ancestors_mask()
    # A second propose with nothing observed in between (its verify step did not run)
    # redoes the newest pair and drafts the same tokens.
    assert drafter.propose([req], k)["r"].resolve() == got
    drafter.release(req)
    drafter.pool.check_no_leak(0)


@pytest.mark.parametrize("vocab", [0, 96], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("catchup", ["decode", "prefill"])
@pytest.mark.parametrize("tree", [None, (3, 10)], ids=["chain", "tree3x10"])
def test_drafter_matches_training_simulation(tiny_model_dir: str, tiny: LoadedModel, tmp_path, tree, catchup,
                                             vocab, monkeypatch) -> None:
    """EagleDrafter's drafts (chain or tree) equal simulate.draft_trees, which training's
    validation accept lengths are computed from, with the prompt in the head's context;
    catch-ups in decode shape (one row per pair) or as a prefill; over the whole vocabulary
    or a draft vocabulary (saved with the head), whose tokens are then the only drafts."""
    monkeypatch.setattr(eagle, "DECODE_CATCHUP", 8 if catchup == "decode" else 0)
    head = random_head(tiny, seed=2)
    if vocab:
        head.draft_ids = torch.randperm(512, generator=torch.Generator().manual_seed(4))[:vocab].sort().values
    save_head(str(tmp_path / "h"), head, {"target_model": "tiny"})
    spec = f"{tree[0]}x{tree[1]}" if tree else "chain"
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", speculative="eagle", draft_model=str(tmp_path / "h"),
                    speculative_tree=spec, num_draft_tokens=4, page_size=4)
    drafter = engine.core.drafter
    assert isinstance(drafter, EagleDrafter) and drafter.wants_prompt_hidden
    if vocab:
        assert torch.equal(drafter.head.draft_ids, head.draft_ids) and drafter.vocab.weight.shape[0] == vocab
    proposed: list[torch.Tensor] = []
    propose = drafter.propose

    def record(reqs, k):
        out = propose(reqs, k)
        proposed.extend(torch.tensor(d.resolve().tokens) for d in out.values())
        return out

    drafter.propose = record
    feed_and_compare(drafter, tree, (4, 3), (1, 3, 2, 1), k=4, seed=0)
    feed_and_compare(drafter, tree, (2, 3), (2, 1), k=4, seed=1, cached=4)  # a prefix-cache hit
    if vocab:
        assert proposed and all(torch.isin(t, head.draft_ids).all() for t in proposed)


def test_long_prompt_is_cached_in_chunks(tiny_model_dir: str, tiny: LoadedModel, tmp_path, monkeypatch) -> None:
    """A prompt longer than MAX_PENDING stays in the head's context (prompt pairs are never
    dropped for it); the catch-up caches it over several forwards of CATCHUP_CHUNK pairs."""
    save_head(str(tmp_path / "h"), random_head(tiny, seed=3), {"target_model": "tiny"})
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", speculative="eagle", draft_model=str(tmp_path / "h"),
                    page_size=4)
    drafter = engine.core.drafter
    monkeypatch.setattr(eagle, "MAX_PENDING", 6)
    monkeypatch.setattr(eagle, "CATCHUP_CHUNK", 5)
    monkeypatch.setattr(eagle, "CATCHUP_ROWS", 5)
    rows: list[int] = []
    cache_pairs = drafter._cache_pairs
    monkeypatch.setattr(drafter, "_cache_pairs", lambda states, counts: (rows.append(sum(counts)), cache_pairs(states, counts))[1])
    feed_and_compare(drafter, None, (9, 8, 6), (1, 4, 2), k=3, seed=1)
    # The first propose cached 22 prompt pairs + 1 generated one: 5 + 5 + 5 + 5, then 3.
    assert rows[:5] == [5, 5, 5, 5, 3]


def test_engine_hidden_is_hf_last_hidden_state(tiny_model_dir: str, tiny: LoadedModel, tmp_path) -> None:
    """The features the drafter observes are transformers' last_hidden_state (post final
    norm) at the rows that produced the accepted tokens: what train-draft trains on."""
    save_head(str(tmp_path / "h"), random_head(tiny), {"target_model": "tiny"})
    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", speculative="eagle",
                    draft_model=str(tmp_path / "h"), speculative_policy="fixed", page_size=4)
    seen: dict[str, list[tuple[int, list[int], torch.Tensor]]] = {}
    observe = engine.core.drafter.observe

    def record(req: Req, accepted: list[int], hidden: torch.Tensor | None) -> None:
        seen.setdefault(req.rid, []).append((req.seq_len, list(accepted), hidden.clone()))
        observe(req, accepted, hidden)

    engine.core.drafter.observe = record
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    results = engine.generate(ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    hf = reference_hf_model(tiny_model_dir)
    for (rid, calls), prompt, r in zip(sorted(seen.items()), ids, results):
        full = prompt + r.token_ids
        with torch.no_grad():
            ref = hf.model(torch.tensor([full])).last_hidden_state[0]
        for seq_len, accepted, hidden in calls:
            assert full[seq_len : seq_len + len(accepted)] == accepted
            torch.testing.assert_close(hidden, ref[seq_len - 1 : seq_len - 1 + len(accepted)], rtol=1e-4, atol=1e-4)
    engine.shutdown()


@pytest.fixture(scope="module")
def trained_head(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("eagle") / "head")
    assert train_draft.main(["--model", tiny_model_dir, "--out", out, *TRAIN_ARGS]) == 0
    return out


def test_train_draft_with_a_draft_vocabulary(tiny_model_dir: str, tmp_path) -> None:
    """--draft-vocab N: the head keeps the N tokens the target generated most (reported
    with their coverage), drafts only those, and outputs stay exact."""
    out = str(tmp_path / "head")
    assert train_draft.main(["--model", tiny_model_dir, "--out", out, *TRAIN_ARGS, "--draft-vocab", "40"]) == 0
    with open(os.path.join(out, CONFIG_FILE)) as fh:
        meta = json.load(fh)
    assert meta["draft_vocab_size"] == 40 and 0.0 < meta["train"]["draft_vocab_coverage"] <= 1.0
    kw = dict(device="cpu", dtype="float32", page_size=4)
    base = Engine(tiny_model_dir, **kw)
    spec = Engine(tiny_model_dir, **kw, speculative="eagle", draft_model=out, speculative_policy="fixed")
    ids = spec.core.drafter.head.draft_ids
    assert ids is not None and len(ids) == 40 and bool((ids[1:] > ids[:-1]).all())
    drafted: list[int] = []
    propose = spec.core.drafter.propose

    def record(reqs, k):
        res = propose(reqs, k)
        drafted.extend(t for d in res.values() for t in d.resolve().tokens)
        return res

    spec.core.drafter.propose = record
    prompts = [train_draft.prompt_ids(spec, train_draft.make_prompts(5, 0))[1],
               *(spec.tokenizer(p)["input_ids"] for p in PROMPTS[:3])]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in spec.generate(prompts, params)] == [r.token_ids for r in base.generate(prompts, params)]
    assert drafted and set(drafted) <= set(ids.tolist())
    with pytest.raises(SystemExit):
        train_draft.parse_args(["--out", out, "--draft-vocab", "-1"])


def test_train_draft_writes_a_checkpoint(trained_head: str, tiny_model_dir: str) -> None:
    with open(os.path.join(trained_head, CONFIG_FILE)) as fh:
        meta = json.load(fh)
    assert meta["target_path"] == os.path.abspath(tiny_model_dir)
    assert meta["hidden_size"] == 64 and meta["vocab_size"] == 512
    m = meta["metrics"]
    # The defaults: --eval-k 6 --eval-tree 6x32 (the tree measured fastest at batch 1).
    assert 0.0 <= m["val_top1"] <= 1.0 and m["val_accept_length_k6"] >= 1.0 and m["val_accept_length_tree6x32_k6"] >= 1.0
    # Per serving step: between 1 (nothing accepted) and k + 1 (all k drafts and the bonus).
    assert 1.0 <= m["val_serving_accept_length_k6"] <= 7.0 and 1.0 <= m["val_serving_accept_length_tree6x32_k6"] <= 7.0
    assert m["val_serving_steps"] >= 1
    # Greedy validation data and the features of one forward agree on every next token.
    assert m["val_target_agreement"] == 1.0
    assert m["train_top1"] > 0.5 and m["train_top1_step1"] > 0.5  # it fits the data it was trained on


@pytest.mark.parametrize("tree,graph_rows", [("chain", 0), ("4x12", 0), ("chain", 512)],
                         ids=["chain", "4x12", "chain-decode-shape-prefill"])
def test_eagle_greedy_identical_no_leaks_and_accepts(trained_head: str, tiny_model_dir: str, tree: str,
                                                     graph_rows: int) -> None:
    """Chains and trees: greedy outputs equal the target's own, drafts are accepted on a
    training prompt (its second run hits the prefix cache: the head's context then starts
    after the cached prompt part), sampling runs, and no page of either pool leaks.
    graph_rows: prompts run in decode shape (as on CUDA when a batch fits the graphs), so
    the head reads prompt features from decode-shape rows."""
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    spec = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="eagle",
                  draft_model=trained_head, speculative_policy="fixed", speculative_tree=tree)
    spec.core.runner.graph_rows = graph_rows
    # A prompt of the training set, decoded as train-draft decoded it (greedy, eos honoured).
    train_prompt = train_draft.prompt_ids(spec, train_draft.make_prompts(5, 0))[1]
    trained = SamplingParams(max_tokens=24, temperature=0.0)
    a = base.generate([train_prompt], trained)[0]
    b = spec.generate([train_prompt], trained)[0]
    assert b.token_ids == a.token_ids
    assert b.accept_length > 1.0, f"no draft accepted on a training prompt: {b.accept_length}"

    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS + [train_prompt]
    ref = [r.token_ids for r in base.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [r.token_ids for r in got] == ref
    sampled = spec.generate(prompts, SamplingParams(max_tokens=12, temperature=0.8, seed=5))
    assert all(r.token_ids for r in sampled)
    spec.shutdown()
    spec.core.pool.check_no_leak(0)
    spec.core.drafter.pool.check_no_leak(0)
    assert not spec.core.drafter.states


def test_prefilled_request_drafts_like_a_local_prefill(trained_head: str, tiny_model_dir: str) -> None:
    """Disaggregated: a prefill engine keeps the prompt's hidden states (what the prefill
    worker sends with the KV); a decode engine given them by add_prefilled drafts exactly
    what an engine that prefilled the prompt itself drafts. Inconsistent ones are refused
    before any state changes."""
    kw = dict(device="cpu", dtype="float32", page_size=4)
    eagle = dict(speculative="eagle", draft_model=trained_head, speculative_policy="fixed")
    prefill = Engine(tiny_model_dir, export_prompt_hidden=True, **kw).core
    ids = train_draft.prompt_ids(Engine(tiny_model_dir, **kw), train_draft.make_prompts(5, 0))[1]
    req = prefill.add_request("p", ids, SamplingParams(max_tokens=1, temperature=0.0))
    while not req.finished:
        prefill.step()
    hidden = torch.cat(req.prompt_hidden)
    assert req.prompt_hidden_start == 0 and hidden.shape == (len(ids), 64)

    local = Engine(tiny_model_dir, **kw, **eagle).core
    lreq = local.add_request("x", ids, SamplingParams(max_tokens=8, temperature=0.0))
    local.step()  # prefill + first token
    assert lreq.output_ids == req.output_ids
    decode = Engine(tiny_model_dir, **kw, **eagle).core
    pages = decode.pool.alloc(decode.pool.pages_for(len(ids) + 1))
    with pytest.raises(ValueError, match="do not end at the prompt's last position"):
        decode.add_prefilled("x", ids, lreq.params, pages, req.output_ids[0], None, 0,
                             prompt_hidden=hidden[:-1], hidden_start=0)
    assert "x" not in decode.requests
    decode.add_prefilled("x", ids, lreq.params, pages, req.output_ids[0], None, 0, prompt_hidden=hidden, hidden_start=0)
    dreq = decode.requests["x"]
    assert dreq.all_ids == lreq.all_ids
    assert decode.drafter.propose([dreq], 4)["x"].resolve() == local.drafter.propose([lreq], 4)["x"].resolve()


@pytest.mark.parametrize("tree,every", [("chain", 11), ("4x12", 23)])
def test_eagle_drafting_on_and_off_stays_exact(trained_head: str, tiny_model_dir: str, tree: str, every: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafting now and then (catch-ups of more pairs than the decode-shape path takes, and,
    past MAX_PENDING, a restarted head context) keeps greedy outputs exact and leaks no page
    of either pool."""
    from runtime.engine.speculative import eagle

    monkeypatch.setattr(eagle, "MAX_PENDING", 16)  # 23 plain steps in a row overflow it
    base = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4)
    spec = Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4, speculative="eagle",
                  draft_model=trained_head, speculative_tree=tree, num_draft_tokens=4)
    spec.core.policy = Intermittent(4, every)
    drafted, propose = [], spec.core.drafter.propose

    def counting(reqs: list[Req], k: int) -> dict:
        out = propose(reqs, k)
        drafted.append(sum(len(d) for d in out.values()))
        return out

    spec.core.drafter.propose = counting
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in spec.generate(PROMPTS, params)] == [r.token_ids for r in base.generate(PROMPTS, params)]
    assert len(drafted) >= 60 // every and all(drafted)  # every drafting step drafted, after the catch-ups
    spec.shutdown()
    spec.core.pool.check_no_leak(0)
    spec.core.drafter.pool.check_no_leak(0)
    assert not spec.core.drafter.states


@pytest.mark.parametrize("tree", ["chain", "4x12"])
def test_drafting_continued_behind_verify_is_exact_and_used(trained_head: str, tiny_model_dir: str, tree: str) -> None:
    check_continued_drafting(trained_head, tiny_model_dir, tree, device="cpu")


def check_continued_drafting(trained_head: str, tiny_model_dir: str, tree: str = "chain", **engine_kw) -> None:
    """Greedy chains and trees: the drafts queued right behind each verify step
    (continue_after_verify: acceptance, catch-up along the accepted run and the next drafts
    on the device) are taken in steady state, give the same outputs as no speculation and
    as drafting after the host read (the same drafts: the same accept lengths), and leak no
    page; a batch that changes (requests ending, mixed lengths) falls back to a fresh
    propose."""
    kw = dict(dtype="float32", page_size=4, **engine_kw)
    eagle_kw = dict(speculative="eagle", draft_model=trained_head, speculative_policy="fixed", num_draft_tokens=4,
                    speculative_tree=tree)
    base = Engine(tiny_model_dir, **kw)
    train_prompt = train_draft.prompt_ids(base, train_draft.make_prompts(5, 0))[1]
    prompts = [train_prompt, *(list(base.tokenizer(p)["input_ids"]) for p in PROMPTS)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 23, 31, 9)][: len(prompts)]
    ref = [base.core.add_request(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
    while base.core.has_work:
        base.core.step()

    def run(continued: bool) -> tuple[list[list[int]], list[float], int]:
        spec = Engine(tiny_model_dir, **kw, **eagle_kw)
        drafter = spec.core.drafter
        # With CUDA graphs, the continuation replays its own (a failed capture would fall back silently).
        assert (drafter.continued is not None) == (spec.core.runner.graphs is not None)
        taken, take = [], drafter._take_continued

        def counting(reqs, k):
            out = take(reqs, k)
            taken.append(out is not None)
            return out

        drafter._take_continued = counting
        if not continued:
            drafter.continue_after_verify = lambda *a: False
        reqs = [spec.core.add_request(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
        while spec.core.has_work:
            spec.core.step()
        spec.shutdown()
        spec.core.pool.check_no_leak(0)
        drafter.pool.check_no_leak(0)
        assert not drafter.states
        return [r.output_ids for r in reqs], [r.accept_length for r in reqs], sum(taken)

    out, accept, used = run(continued=True)
    assert out == [r.output_ids for r in ref]
    out_plain, accept_plain, used_plain = run(continued=False)
    assert out_plain == out and used_plain == 0
    assert accept == accept_plain
    assert used >= 5 and max(accept) > 1.0
