"""TorchAttention against a dense per-sequence float64 reference written here, on ragged
batches (cached prefixes, decode rows next to long prompts, GQA, custom masks, tree rows,
pages scattered over the cache), and its memory: a 3,500-token prompt sharing steps with 64
decode rows asks SDPA for scores in proportion to its own tokens, not for B * max_q * max_kv."""
from __future__ import annotations

import random
import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from runtime import Engine, SamplingParams
from runtime.engine.attention.base import AttentionMetadata
from runtime.engine.attention.torch_ref import TorchAttention

D = 16


class _Spy:
    """Wraps F.scaled_dot_product_attention: counts calls and the largest fp32 score matrix
    (n * Hq * q * kv * 4 bytes) and mask (as SDPA's float copy of it) asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.score_bytes = self.mask_bytes = 0
        real = F.scaled_dot_product_attention

        def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, **kw):
            self.calls += 1
            self.score_bytes = max(self.score_bytes, q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4)
            if attn_mask is not None:
                self.mask_bytes = max(self.mask_bytes, attn_mask.numel() * 4)
            return real(q, k, v, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def _batch(rows: list[tuple[int, int, int]], hq: int, hkv: int, ps: int, dtype: torch.dtype, seed: int,
           custom: bool = False, tree: bool = False) -> dict:
    """rows: (q_len, kv_len, sequence id); rows of one sequence id share its page list (the
    decode-shape rows of a verify tree). Pages are drawn in random order from a larger cache."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need: dict[int, int] = {}
    for _, kv, s in rows:
        need[s] = max(need.get(s, 0), kv)
    num_pages = sum(-(-kv // ps) for kv in need.values()) + 7
    free = list(range(num_pages))
    rng.shuffle(free)
    lists = {s: [free.pop() for _ in range(-(-kv // ps))] for s, kv in need.items()}
    page_lists = [lists[s] for _, _, s in rows]
    q_lens, kv_lens = [r[0] for r in rows], [r[1] for r in rows]
    k_cache = torch.randn(num_pages, ps, hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, ps, hkv, D, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), hq, D, generator=gen).to(dtype)
    mask = tree_start = tree_bits = None
    if custom:  # random, but every query sees itself
        mask = torch.rand(len(rows), max(q_lens), max(kv_lens), generator=gen) < 0.6
        for i, (ql, kv, _) in enumerate(rows):
            mask[i, torch.arange(ql), kv - ql + torch.arange(ql)] = True
    if tree:  # every third decode row is a tree node over the last up to 40 positions; the rest see everything
        tree_start, tree_bits = [], []
        for i, (ql, kv, _) in enumerate(rows):
            start = max(0, kv - rng.randint(1, 40)) if i % 3 == 0 and ql == 1 else kv
            bits = (rng.getrandbits(63) | (1 << (kv - 1 - start))) if start < kv else 0
            tree_start.append(start)
            tree_bits.append(bits)
    meta = AttentionMetadata.build(q_lens, kv_lens, page_lists, ps, torch.device("cpu"), custom_mask=mask,
                                   tree_start=tree_start, tree_bits=tree_bits)
    return dict(meta=meta, q=q, k=k_cache, v=v_cache, page_lists=page_lists, mask=mask,
                tree_start=tree_start, tree_bits=tree_bits)


def _reference(b: dict, scale: float) -> torch.Tensor:
    """Dense float64 attention, one sequence at a time, straight from the definition."""
    meta, q = b["meta"], b["q"].double()
    ps, hq, hkv = meta.page_size, q.shape[1], b["k"].shape[2]
    keys, vals = b["k"].double().flatten(0, 1), b["v"].double().flatten(0, 1)
    out, t = [], 0
    for i, (ql, kv) in enumerate(zip(meta.q_lens_cpu, meta.kv_lens_cpu)):
        slots = [b["page_lists"][i][p // ps] * ps + p % ps for p in range(kv)]
        k = keys[slots].repeat_interleave(hq // hkv, 1)  # [kv, Hq, D]
        v = vals[slots].repeat_interleave(hq // hkv, 1)
        allowed = torch.tensor([[p <= kv - ql + j for p in range(kv)] for j in range(ql)])
        if b["mask"] is not None:
            allowed &= b["mask"][i, :ql, :kv]
        if b["tree_start"] is not None:
            start, bits = b["tree_start"][i], b["tree_bits"][i]
            allowed &= torch.tensor([p < start or (p - start < 64 and (bits >> (p - start)) & 1 == 1) for p in range(kv)])
        s = torch.einsum("qhd,khd->hqk", q[t : t + ql], k) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        t += ql
    return torch.cat(out)


def _run(b: dict, scale: float, **budget: int) -> torch.Tensor:
    attn = TorchAttention(**budget)
    attn.prepare(b["meta"])
    first = attn.forward(b["q"], b["k"], b["v"], scale)
    again = attn.forward(b["q"], b["k"], b["v"], scale)  # a second layer reuses the plan
    assert torch.equal(first, again)
    return first


def _ragged(rng: random.Random, n_decode: int, long_rows: int, n_verify: int = 0) -> list[tuple[int, int, int]]:
    """Decode rows (1, kv), tree-like decode rows sharing one sequence's pages, prefills with and
    without a cached prefix, and verify-like rows of a few queries."""
    rows: list[tuple[int, int, int]] = []
    sid = 0
    for _ in range(n_decode):
        rows.append((1, rng.randint(1, 300), sid))
        sid += 1
    base = rng.randint(20, 80)
    rows += [(1, base + k, sid) for k in range(1, 6)]  # five rows of one sequence
    sid += 1
    for _ in range(long_rows):
        ql = rng.randint(17, 400)
        rows.append((ql, ql + rng.choice([0, 0, rng.randint(1, 300)]), sid))
        sid += 1
    for _ in range(n_verify):
        ql = rng.randint(2, 6)
        rows.append((ql, ql + rng.randint(0, 100), sid))
        sid += 1
    rng.shuffle(rows)
    return rows


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["plain", "custom", "tree", "custom+tree"])
@pytest.mark.parametrize("budget", ["default", "small"])
def test_matches_dense_reference(ps: int, heads: tuple[int, int], kind: str, budget: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hq, hkv = heads
    seed = zlib.crc32(repr((ps, heads, kind, budget)).encode())
    rows = _ragged(random.Random(seed), n_decode=20, long_rows=4, n_verify=3)
    b = _batch(rows, hq, hkv, ps, torch.float32, seed, custom="custom" in kind, tree="tree" in kind)
    # small: at most 3,000 score elements per head in one call, so long rows run in query
    # chunks and decode rows split into several calls
    kw = dict(score_bytes=3000 * hq * 4, key_bytes=4000 * hkv * D * 4) if budget == "small" else {}
    spy = _Spy(monkeypatch)
    got = _run(b, D**-0.5, **kw)
    torch.testing.assert_close(got.double(), _reference(b, D**-0.5), atol=TOL[torch.float32], rtol=0)
    if budget == "small":
        assert spy.score_bytes <= kw["score_bytes"]
        small_calls, spy.calls = spy.calls, 0
        _run(b, D**-0.5)
        assert small_calls > spy.calls  # the budget did split rows and chunk queries


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["custom", "tree"])
def test_half_precision_matches_reference(dtype: torch.dtype, kind: str) -> None:
    """Half precision, GQA: the decode rows take the grouped-heads call (_sdpa_call)."""
    rows = _ragged(random.Random(7), n_decode=12, long_rows=3, n_verify=2)
    b = _batch(rows, 8, 2, 16, dtype, 7, custom=kind == "custom", tree=kind == "tree")
    got = _run(b, D**-0.5, score_bytes=2000 * 8 * 4)
    torch.testing.assert_close(got.double(), _reference(b, D**-0.5), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("budget", ["default", "small"])
def test_host_key_counts_may_be_upper_bounds(budget: str) -> None:
    """kv_lens_cpu may exceed the device kv_lens (the EAGLE drafter and the CUDA-graph capture
    pass such hints): sizes follow the host counts, the mask the device ones."""
    rng = random.Random(11)
    rows = _ragged(rng, n_decode=16, long_rows=3, n_verify=2)
    b = _batch(rows, 8, 2, 16, torch.float32, 11, tree=True)
    want = _reference(b, D**-0.5)
    meta = b["meta"]
    b["meta"] = replace(meta, kv_lens_cpu=[kv + rng.choice([0, 1, 7, 40]) for kv in meta.kv_lens_cpu])
    kw = dict(score_bytes=3000 * 8 * 4) if budget == "small" else {}
    torch.testing.assert_close(_run(b, D**-0.5, **kw).double(), want, atol=2e-5, rtol=0)


def test_decode_batch_of_similar_rows_is_one_call_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 decode rows of 100 to 140 keys pad into one SDPA call, not 64 (the CPU suite's speed)."""
    rng = random.Random(3)
    rows = [(1, rng.randint(100, 140), i) for i in range(64)]
    b = _batch(rows, 8, 2, 16, torch.float32, 3)
    spy = _Spy(monkeypatch)
    got = _run(b, D**-0.5)
    assert spy.calls == 2  # two layers
    torch.testing.assert_close(got.double(), _reference(b, D**-0.5), atol=2e-5, rtol=0)


def test_mixed_decode_and_long_prompt_memory_through_engine(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's batch: 64 decode rows (~100-token contexts) and a 3,500-token prompt in the
    same steps, on a tiny 8-head model. Padding it densely asked SDPA for 65 x 8 x 3,500 x
    3,600 fp32 scores (25 GB) and a 0.8 G-element mask; per-sequence calls stay near 256 MB."""
    import transformers

    transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                             ).save_pretrained(tmp_path)
    batches: list[list[int]] = []
    prepare = TorchAttention.prepare

    def record(self: TorchAttention, meta: AttentionMetadata) -> None:
        batches.append(list(meta.q_lens_cpu))
        prepare(self, meta)

    monkeypatch.setattr(TorchAttention, "prepare", record)
    engine = Engine(str(tmp_path), load_format="dummy", device="cpu", dtype="float32", attention_backend="torch",
                    page_size=16, prefix_cache=False)
    spy = _Spy(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (100,), generator=gen).tolist() for _ in range(64)]
    prompts.append(torch.randint(3, 500, (3500,), generator=gen).tolist())
    results = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(r.token_ids) for r in results] == [8] * 65
    mixed = [q for q in batches if q.count(1) >= 60 and max(q) >= 1000]
    assert mixed, f"no step mixed decode rows with the long prompt: {[(len(q), max(q)) for q in batches]}"
    assert spy.score_bytes <= 300 << 20, spy.score_bytes
    assert spy.mask_bytes <= 300 << 20, spy.mask_bytes
    engine.shutdown()
    engine.core.pool.check_no_leak(0)
