"""Draft trees: TreeBuilder keeps exactly the nodes a plain-Python EAGLE-2 expansion keeps,
as a valid DraftTree (parents first, distinct siblings best first); greedy verification of a
tree (simulate.accept_lengths) follows the matching path."""
from __future__ import annotations

import itertools

import random

import pytest
import torch

from runtime.engine.speculative.base import DraftTree
from runtime.engine.draft_tree import DeviceDrafts
from runtime.engine.speculative.simulate import accept_lengths
from runtime.engine.speculative.tree import (DraftVocab, TreeBuilder, ancestor_bits, best_tokens, greedy_path,
                                             top_logprobs)

V = 12


def _logp(path: tuple[int, ...], seed: int) -> torch.Tensor:
    """A fixed log-distribution over V tokens after `path` (the drafter head's stand-in)."""
    g = torch.Generator().manual_seed(hash((seed, path)) % (2**31))
    return (torch.randn(V, generator=g) * 2.5).log_softmax(-1)


def _reference(branch: int, depth: int, nodes: int, seed: int) -> list[tuple[tuple[int, ...], float]]:
    """EAGLE-2 written out: (path, cumulative log-prob) of the kept nodes."""
    cands: list[tuple[tuple[int, ...], float]] = []
    frontier = [((), 0.0)]
    for _ in range(depth):
        children = []
        for path, score in frontier:
            lp = _logp(path, seed)
            top = lp.topk(branch)
            children += [(path + (t,), score + v) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        cands += children
        frontier = sorted(children, key=lambda c: -c[1])[:branch]
    return sorted(cands, key=lambda c: -c[1])[:nodes]


def _build(branch: int, depth: int, nodes: int, seeds: list[int]) -> tuple[torch.Tensor, ...]:
    """TreeBuilder over len(seeds) trees at once, fed with _logp."""
    n = len(seeds)
    tb = TreeBuilder(branch, depth)
    front = tb.start(*torch.stack([_logp((), s) for s in seeds]).topk(branch))
    paths = [[(t,) for t in front.tokens[i].tolist()] for i in range(n)]
    for _ in range(depth - 1):
        lp = torch.stack([torch.stack([_logp(p, s) for p in ps]) for ps, s in zip(paths, seeds)])  # [n, b, V]
        front = tb.grow(*lp.topk(branch))
        paths = [[paths[i][f] + (t,) for f, t in zip(front.parent[i].tolist(), front.tokens[i].tolist())]
                 for i in range(n)]
    return tb.select(nodes)


@pytest.mark.parametrize(("branch", "depth", "nodes"), [(1, 4, 4), (2, 3, 5), (3, 4, 12), (4, 3, 40), (3, 1, 2)])
def test_tree_builder_matches_reference(branch: int, depth: int, nodes: int) -> None:
    seeds = [0, 1, 2]
    # What a verify step reads from the device instead of the host tree: depths and masks.
    tokens, parents, depths, bits = _build(branch, depth, nodes, seeds)
    assert torch.equal(bits, ancestor_bits(parents, depth))
    for i, s in enumerate(seeds):
        tree = DraftTree(tokens[i].tolist(), parents[i].tolist())  # validates parents-first
        assert depths[i].tolist() == tree.depths()
        assert bits[i].tolist() == tree.ancestors_mask()
        ref = _reference(branch, depth, nodes, s)
        assert len(tree) == len(ref) == min(nodes, branch + (depth - 1) * branch * branch)
        paths = []
        for t, p in zip(tree.tokens, tree.parents):
            paths.append((paths[p] if p >= 0 else ()) + (t,))
        assert sorted(paths) == sorted(p for p, _ in ref)
        # Siblings: distinct, and in the order of their parent's distribution (best first).
        for p in set(tree.parents):
            kids = [t for t, q in zip(tree.tokens, tree.parents) if q == p]
            parent_path = paths[p] if p >= 0 else ()
            assert kids == _logp(parent_path, s).topk(len(kids)).indices.tolist()
        if branch == 1:
            assert tree.is_chain


@pytest.mark.parametrize("max_depth", [1, 2, 3, 4, 5, 8, 9])
def test_ancestor_bits_match_the_host_mask(max_depth: int) -> None:
    """Random trees of depth up to max_depth (chains of exactly that depth included): the
    device pointer-jumping masks equal DraftTree.ancestors_mask."""
    rng = random.Random(max_depth)
    trees = [DraftTree.chain(list(range(max_depth)))]
    for _ in range(20):
        parents, depth = [], []
        for i in range(rng.randrange(1, 40)):
            options = [-1] + [j for j in range(i) if depth[j] < max_depth]
            p = rng.choice(options)
            parents.append(p)
            depth.append(1 if p < 0 else depth[p] + 1)
        trees.append(DraftTree([0] * len(parents), parents))
    n = max(len(t) for t in trees)
    # Pad rows with extra root children (any valid tree works; only the real prefix is checked).
    par = torch.tensor([t.parents + [-1] * (n - len(t)) for t in trees])
    bits = ancestor_bits(par, max_depth)
    for t, row in zip(trees, bits.tolist()):
        assert row[: len(t)] == t.ancestors_mask()


def test_greedy_path_matches_host_acceptance() -> None:
    """The device acceptance of continued drafting: on random trees (distinct siblings) and
    target argmaxes that often follow the tree, the tokens gained and the rows along the
    accepted path equal a host walk from the root (what EngineCore._accept does greedily)."""
    rng = random.Random(7)
    max_depth, n = 6, 24
    rows_tok, rows_par, want_gain, want_path, argmaxes = [], [], [], [], []
    for _ in range(200):
        parents, depth, kids = [], [], {-1: []}
        for i in range(n):
            p = rng.choice([-1] + [j for j in range(i) if depth[j] < max_depth])
            parents.append(p)
            depth.append(1 if p < 0 else depth[p] + 1)
            kids.setdefault(p, []).append(i)
            kids[i] = []
        tokens = [0] * n
        for p, cs in kids.items():  # siblings get distinct tokens
            for t, c in zip(rng.sample(range(50), len(cs)), cs):
                tokens[c] = t
        # The target follows a random child with probability 0.8 at each row.
        am = [rng.randrange(50) for _ in range(n + 1)]
        for r in range(n + 1):
            cs = kids[r - 1]
            if cs and rng.random() < 0.8:
                am[r] = tokens[rng.choice(cs)]
        row, path = 0, [0]
        while True:
            nxt = next((c for c in kids[row - 1] if tokens[c] == am[row]), None)
            if nxt is None:
                break
            row = nxt + 1
            path.append(row)
        want_gain.append(len(path))
        want_path.append(path)
        rows_tok.append(tokens)
        rows_par.append(parents)
        argmaxes.append(am)
    tok, par = torch.tensor(rows_tok), torch.tensor(rows_par)
    depths = torch.tensor([DraftTree(t, p).depths() for t, p in zip(rows_tok, rows_par)])
    gained, path = greedy_path(tok, par, depths, ancestor_bits(par, max_depth), torch.tensor(argmaxes), max_depth)
    assert gained.tolist() == want_gain
    assert max(want_gain) >= 4 and min(want_gain) == 1  # deep and empty runs both occur
    for got, want in zip(path.tolist(), want_path):
        assert got[: len(want)] == want and all(r == 0 for r in got[len(want) :])


def test_tree_keeps_parents_when_a_child_is_certain() -> None:
    """A child with log-probability 0 ties its parent; the parent must still be kept."""
    tb = TreeBuilder(2, 2)
    lp = torch.tensor([[0.0, -30.0]])
    tb.start(lp, torch.tensor([[5, 6]]))
    tb.grow(torch.tensor([[[0.0, -40.0], [0.0, -50.0]]]), torch.tensor([[[7, 8], [9, 10]]]))
    tokens, parents, _, _ = tb.select(2)
    assert tokens.tolist() == [[5, 7]] and parents.tolist() == [[-1, 0]]


def test_fused_lm_head_serves_where_it_was_measured_faster() -> None:
    """The fused kernel's rows: SmolLM2's head (28M weights) up to 256 rows, a Llama-3-8B
    head (525M) up to 16 (it measured slower than torch at 64)."""
    from runtime.engine.speculative.tree import fused_serves

    smol, llama = 49152 * 576, 128256 * 4096
    assert fused_serves(1, smol) and fused_serves(64, smol) and fused_serves(256, smol)
    assert not fused_serves(257, smol) and not fused_serves(4096, smol)
    assert fused_serves(16, llama) and not fused_serves(17, llama) and not fused_serves(64, llama)


def test_top_logprobs_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, w = torch.randn(3, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    lp, ids = top_logprobs(hidden, DraftVocab(w), 4, chunk_rows=4)
    full = (hidden @ w.T).log_softmax(-1).topk(4)
    torch.testing.assert_close(lp, full.values)
    assert torch.equal(ids, full.indices)


def test_draft_vocab_scores_only_its_tokens() -> None:
    """A draft vocabulary: the argmax and top-k over its rows only, normalised over them,
    returned as token ids of the full vocabulary."""
    g = torch.Generator().manual_seed(1)
    hidden, w = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    keep = torch.randperm(V, generator=g)[: V // 3].sort().values
    vocab = DraftVocab(w[keep], keep)
    logits = hidden @ w.T
    masked = torch.full_like(logits, float("-inf"))
    masked[:, keep] = logits[:, keep]
    assert torch.equal(best_tokens(hidden, vocab), masked.argmax(-1))
    lp, ids = top_logprobs(hidden, vocab, 3)
    want = masked.log_softmax(-1).topk(3)
    torch.testing.assert_close(lp, want.values)
    assert torch.equal(ids, want.indices) and torch.isin(ids, keep).all()


def test_accept_lengths_follow_the_matching_path() -> None:
    # Root children 5 and 6; 5 -> 7 -> 8, 6 -> 9.
    tree = DraftTree([5, 6, 7, 9, 8], [-1, -1, 0, 1, 2])
    toks, pars = torch.tensor([tree.tokens] * 5), torch.tensor([tree.parents] * 5)
    want = torch.tensor([[5, 7, 8], [6, 9, 1], [5, 7, 1], [1, 5, 7], [6, 7, 8]])
    assert accept_lengths(toks, pars, want).tolist() == [4, 3, 3, 1, 2]
    # Brute force over every continuation of a chain: 1 + leading matches.
    chain = DraftTree.chain([1, 2, 3])
    for w in itertools.product([1, 2, 3], repeat=3):
        lead = 0
        while lead < 3 and w[lead] == chain.tokens[lead]:
            lead += 1
        got = accept_lengths(torch.tensor([chain.tokens]), torch.tensor([chain.parents]), torch.tensor([w]))
        assert got.tolist() == [1 + lead]


def test_speculative_tree_flag_parses_and_checks() -> None:
    from runtime.cli import build_parser, engine_kwargs
    from runtime.config import EngineConfig

    a = build_parser().parse_args(["generate", "hi", "--speculative", "eagle", "--draft-model", "h",
                                   "--speculative-tree", "8x48", "--num-draft-tokens", "6"])
    cfg = EngineConfig(**engine_kwargs(a))
    assert (cfg.draft_tree, cfg.draft_tree_nodes, cfg.num_draft_tokens) == ((8, 48), 48, 6)
    assert EngineConfig().draft_tree is None and EngineConfig().draft_tree_nodes == 0  # chain by default
    for kw, msg in [(dict(speculative="ngram", speculative_tree="4x8"), "needs speculative 'eagle'"),
                    (dict(speculative="eagle", speculative_tree="4x64"), "N <= 63"),
                    (dict(speculative="eagle", speculative_tree="1x8"), "B = 1 is 'chain'"),
                    (dict(speculative="eagle", speculative_tree="wide"), "'chain' or 'BxN'"),
                    (dict(speculative="eagle", speculative_tree="16x32", num_draft_tokens=6), r"\(num_draft_tokens - 1\) \* B")]:
        with pytest.raises(ValueError, match=msg):
            EngineConfig(**kw)


@pytest.mark.parametrize("tree", [False, True])
def test_device_drafts_fill_verify_rows(tree: bool) -> None:
    """DeviceDrafts.write_rows puts each draft's token (and for trees its depth and ancestor
    bits) into its verify row: for every request verifying all drafts in order (strided
    views) and for any other layout (index copies), the same as building the rows from the
    host trees."""
    g = torch.Generator().manual_seed(1)
    b, n = 3, 4
    tokens = torch.randint(0, 100, (b, n), generator=g)
    parents = torch.tensor([[-1, 0, 0, 1], [-1, -1, 1, 2], [-1, 0, 1, 2]]) if tree else None
    depths = torch.tensor([[1, 2, 2, 3], [1, 1, 2, 3], [1, 2, 3, 4]]) if tree else None
    bits = ancestor_bits(parents, n) if tree else None
    drafts = DeviceDrafts(tokens, parents, depths, bits)
    for cut in (n, 2):  # all drafts verified (strided path), or the first 2 of each (index path)
        rows = ([], [])
        for i in range(b):
            rows[0].extend(range(i * (cut + 1) + 1, i * (cut + 1) + 1 + cut))
            rows[1].extend(range(i * n, i * n + cut))
        size = b * (cut + 1) + 2  # as a graph's static inputs: longer than the rows
        ids, pos, bit = torch.full((size,), -1), torch.full((size,), 10), torch.zeros(size, dtype=torch.int64)
        drafts.write_rows(rows, ids, pos, bit if tree else None)
        for i in range(b):
            row = slice(i * (cut + 1) + 1, i * (cut + 1) + 1 + cut)
            assert ids[row].tolist() == tokens[i, :cut].tolist()
            if tree:
                host = DraftTree(tokens[i].tolist(), parents[i].tolist()).truncated(cut)
                assert (pos[row] - 10).tolist() == host.depths() and bit[row].tolist() == host.ancestors_mask()
            assert ids[i * (cut + 1)] == -1  # each request's own first row is left alone
        assert ids[b * (cut + 1) :].tolist() == [-1, -1]
