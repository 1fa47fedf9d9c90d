"""The Triton extend-attention kernel, run by Triton's interpreter on CPU, against a dense
float64 reference written here (per sequence: its keys gathered from the pages, the causal
rule, the tree rule).

TRITON_INTERPRET=1 must be set before triton is imported and would change every later
Triton kernel in the process, so the kernel runs in a child process (this file run as a
script); the pytest process checks the wrapper's input validation.
"""
from __future__ import annotations

import sys

import pytest
import torch

from tests.unit._interp import run_cases, run_self_interpreted  # noqa: E402


def dense_reference(q, k_cache, v_cache, page_lists, q_lens, kv_lens, scale, tree=None) -> torch.Tensor:
    """float64 [T, Hq, D]: each sequence's queries over its own keys, one at a time."""
    ps = k_cache.shape[1]
    hq, hkv = q.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pos = torch.arange(kl)
        pages = torch.tensor(page_lists[b], dtype=torch.long)[pos // ps]
        k = k_cache[pages, pos % ps].double().repeat_interleave(hq // hkv, dim=1)  # [kl, Hq, D]
        v = v_cache[pages, pos % ps].double().repeat_interleave(hq // hkv, dim=1)
        qq = q[row : row + ql].double()  # [ql, Hq, D]
        s = torch.einsum("qhd,khd->hqk", qq, k) * scale
        qpos = kl - ql + torch.arange(ql)
        allowed = pos[None, :] <= qpos[:, None]
        if tree is not None:
            rel = pos - tree[0][b]
            bits = (tree[1][b] >> rel.clamp(0, 63)) & 1
            allowed &= ((rel < 0) | ((rel < 64) & (bits == 1)))[None, :]
        s = s.masked_fill(~allowed[None], float("-inf"))
        out[row : row + ql] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
        row += ql
    return out


def _case(name: str, dtype: torch.dtype, hq: int, hkv: int, d: int, page_size: int,
          q_lens: list[int], ctx_lens: list[int], seed: int,
          tree: tuple[list[int], list[int]] | None = None, kv_dtype: torch.dtype | None = None) -> str | None:
    from runtime.kernels.extend_attention import ExtendPlan, extend_attention
    from runtime.engine.attention.base import AttentionMetadata
    from runtime.engine.kv_pool import KVPool

    gen = torch.Generator().manual_seed(seed)
    kv_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    need = [-(-n // page_size) for n in kv_lens]
    pool = KVPool(3, sum(need) + 3, page_size, hkv, d, kv_dtype or dtype, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(kv_dtype or dtype))
    free = (torch.randperm(pool.total_pages, generator=gen) + 1).tolist()
    page_lists = [[free.pop() for _ in range(n)] for n in need]
    tree_start, tree_bits = tree if tree else (None, None)
    meta = AttentionMetadata.build(q_lens, kv_lens, page_lists, page_size, torch.device("cpu"),
                                   tree_start=tree_start, tree_bits=tree_bits)
    k_cache, v_cache = pool.k_cache(1), pool.v_cache(1)  # page-strided views, as served
    t = sum(q_lens)
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=gen).to(dtype)
    q = qkv[:, :hq]  # a strided slice of a packed projection, as the model passes it
    out = torch.full((t, hq, d), float("nan"), dtype=dtype)
    scale = d**-0.5
    plan = ExtendPlan(q_lens, hq, hkv, d, dtype, torch.device("cpu"))
    got = extend_attention(q, k_cache, v_cache, meta.page_table, meta.cu_q_lens, meta.kv_lens, scale, plan,
                           tree_start=meta.tree_start, tree_bits=meta.tree_bits, out=out)
    if got.data_ptr() != out.data_ptr():
        return f"{name}: the result is not written into `out`"
    if torch.isnan(got).any():
        return f"{name}: rows left unwritten (NaN)"
    ref = dense_reference(q, k_cache, v_cache, page_lists, q_lens, kv_lens, scale, tree)
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if not rel <= tol:
        return f"{name}: relative error {rel:.3g} > {tol}"
    return None


CASES = [
    # Ragged prefill with cached prefixes: on page boundaries (16, 32) and not (5, 37),
    # one-token rows among long ones, GQA 3.
    ("ragged_gqa3_fp32", torch.float32, 6, 2, 16, 4, [37, 1, 9, 16, 1], [0, 20, 5, 16, 3], 0),
    # Chunked prefill: a later chunk of a prompt (the earlier chunks are its cached prefix).
    ("chunked_gqa4_fp32", torch.float32, 8, 2, 32, 16, [48, 48], [32, 96], 1),
    # MHA, a head dim that is not a power of two, odd page size.
    ("mha_fp32_odd", torch.float32, 2, 2, 24, 3, [11, 2, 30], [7, 0, 1], 2),
    ("gqa4_bf16", torch.bfloat16, 8, 2, 64, 16, [70, 3, 1], [33, 0, 64], 3),
    ("gqa2_fp16", torch.float16, 4, 2, 32, 8, [40, 17], [0, 9], 4),
    # Tree rows mixed with a prefill row: each one-token row sees the context before
    # tree_start, then only the tree keys its bits name (its ancestors and itself).
    ("tree_mixed_fp32", torch.float32, 6, 2, 16, 4, [1, 1, 1, 25], [12, 12, 8, 6], 5,
     ([9, 9, 9, 31], [0b1001, 0b0111, 0b1, 0])),
    # An FP8 cache beside bf16 / fp16 queries: the kernel widens the e4m3 values it loads,
    # so it matches the reference over the same (exactly representable) values.
    ("fp8kv_gqa4_bf16", torch.bfloat16, 8, 2, 64, 16, [70, 3, 1], [33, 0, 64], 6, None, torch.float8_e4m3fn),
    ("fp8kv_gqa2_fp16", torch.float16, 4, 2, 32, 8, [40, 17], [0, 9], 7, None, torch.float8_e4m3fn),
]


def _main() -> int:
    return run_cases(CASES, _case)


def test_extend_attention_matches_dense_reference_under_interpreter() -> None:
    pytest.importorskip("triton")
    run_self_interpreted(__file__, timeout=600)


def _inputs() -> dict:
    from runtime.kernels.extend_attention import ExtendPlan

    return dict(
        q=torch.randn(5, 4, 16),
        k_cache=torch.randn(6, 4, 2, 16),
        v_cache=torch.randn(6, 4, 2, 16),
        page_table=torch.ones(2, 3, dtype=torch.int32),
        cu_q_lens=torch.tensor([0, 3, 5], dtype=torch.int32),
        kv_lens=torch.tensor([5, 2], dtype=torch.int32),
        scale=0.25,
        plan=ExtendPlan([3, 2], 4, 2, 16, torch.float32, torch.device("cpu")),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(page_table=torch.ones(2, 3, dtype=torch.int64)), "page_table must be int32"),
        (dict(kv_lens=torch.ones(3, dtype=torch.int32)), "kv_lens \\[B\\] for B=2"),
        (dict(q=torch.randn(5, 4, 8)), "head dims differ"),
        (dict(q=torch.randn(5, 4, 16, dtype=torch.float64)), "must share one of"),
        (dict(q=torch.randn(5, 4, 32)[..., ::2]), "head_dim must be contiguous"),
        (dict(v_cache=torch.randn(6, 4, 1, 16)), "caches \\[pages, page_size, Hkv, D\\] alike"),
        (dict(q=torch.randn(5, 6, 16)), "plan made for group 2"),
        (dict(tree_start=torch.zeros(2, dtype=torch.int32)), "go together"),
        ({}, "needs CUDA tensors"),
    ],
)
def test_extend_attention_rejects_bad_input(change: dict, message: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.extend_attention import extend_attention

    args = _inputs()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        extend_attention(**args)


if __name__ == "__main__":
    sys.exit(_main())
