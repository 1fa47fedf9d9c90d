"""The Triton paged-decode kernel, run by Triton's interpreter on CPU, against TorchAttention.

TRITON_INTERPRET=1 must be set before triton is imported and would change every later
Triton kernel in the process, so the kernel runs in a child process (this file run as a
script); the pytest process only checks the wrapper's input validation.
"""
from __future__ import annotations

import sys

import pytest
import torch

from tests.unit._interp import run_cases, run_self_interpreted  # noqa: E402


def _case(
    name: str,
    dtype: torch.dtype,
    hq: int,
    hkv: int,
    d: int,
    page_size: int,
    kv_lens: list[int],
    num_splits: int | None,
    seed: int,
    tree: tuple[list[int], list[int]] | None = None,  # (tree_start, tree_bits) per row
    kv_dtype: torch.dtype | None = None,  # the cache's, when it is not q's (FP8)
    merge: str = "launch",  # "fused": the last split merges (run twice: its counters must reset)
) -> str | None:
    """Runs one case; returns a failure message or None."""
    from runtime.kernels.paged_decode import paged_decode
    from runtime.engine.attention.base import AttentionMetadata
    from runtime.engine.attention.torch_ref import TorchAttention
    from runtime.engine.kv_pool import KVPool

    gen = torch.Generator().manual_seed(seed)
    bsz = len(kv_lens)
    pages_needed = [-(-n // page_size) for n in kv_lens]
    pool = KVPool(2, sum(pages_needed) + 3, page_size, hkv, d, kv_dtype or dtype, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(kv_dtype or dtype))
    # Hand out pages in a random order so each sequence's pages are scattered.
    free = (torch.randperm(pool.total_pages, generator=gen) + 1).tolist()
    page_lists = [[free.pop() for _ in range(n)] for n in pages_needed]
    tree_start, tree_bits = tree if tree else (None, None)
    meta = AttentionMetadata.build([1] * bsz, kv_lens, page_lists, page_size, torch.device("cpu"),
                                   tree_start=tree_start, tree_bits=tree_bits)
    k_cache, v_cache = pool.k_cache(1), pool.v_cache(1)
    # q as a strided slice of a packed qkv projection, out as a strided slice too.
    qkv = torch.randn(bsz, hq + 2 * hkv, d, generator=gen).to(dtype)
    q = qkv[:, :hq]
    out = torch.full((bsz, hq, d + 8), float("nan"), dtype=dtype)[..., :d]
    scale = d**-0.5

    for _ in range(2 if merge == "fused" else 1):
        out.fill_(float("nan"))
        got = paged_decode(q, k_cache, v_cache, meta.page_table, meta.kv_lens, scale, out=out, num_splits=num_splits,
                           tree_start=meta.tree_start, tree_bits=meta.tree_bits, merge=merge)
    if got.data_ptr() != out.data_ptr():
        return f"{name}: the result is not written into `out`"

    live = [i for i, n in enumerate(kv_lens) if n > 0]
    ref_backend = TorchAttention()
    ref_meta = AttentionMetadata.build(
        [1] * len(live), [kv_lens[i] for i in live], [page_lists[i] for i in live], page_size, torch.device("cpu"),
        tree_start=[tree_start[i] for i in live] if tree else None, tree_bits=[tree_bits[i] for i in live] if tree else None,
    )
    ref_backend.prepare(ref_meta)
    ref = ref_backend.forward(q[live].float(), k_cache.float(), v_cache.float(), scale)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    err = (got[live].float() - ref).abs().max().item()
    if not err <= tol:
        return f"{name}: max abs error {err:.3g} > {tol}"
    empty = [i for i, n in enumerate(kv_lens) if n == 0]
    if empty and not torch.all(got[empty] == 0):
        return f"{name}: a sequence with no keys must give zeros, got {got[empty]}"
    return None


CASES = [
    # GQA g=3, page 4, lengths around page boundaries, 1 / 3 / default splits.
    ("gqa3_fp32_split1", torch.float32, 6, 2, 16, 4, [1, 4, 7, 13, 30], 1, 0),
    ("gqa3_fp32_split3", torch.float32, 6, 2, 16, 4, [1, 4, 7, 13, 30], 3, 1),
    ("gqa3_fp32_default", torch.float32, 6, 2, 16, 4, [5, 130, 9], None, 2),
    # More splits than blocks in some sequences: empty chunks must not disturb the merge.
    ("gqa4_fp32_many_splits", torch.float32, 8, 2, 32, 16, [3, 17, 150], 8, 3),
    # MHA, odd page size and a head dim that is not a power of two, plus an empty sequence.
    ("mha_fp32_odd_shapes", torch.float32, 2, 2, 24, 3, [10, 0, 2, 23], 2, 4),
    # g=9 pads the head block to 16 rows.
    ("gqa9_bf16", torch.bfloat16, 9, 1, 64, 16, [70, 33], 2, 5),
    ("gqa2_fp16", torch.float16, 4, 2, 32, 8, [12, 64, 65], 1, 6),
    # Tree rows: ancestors by bitmask past tree_start; a plain row (tree_start = kv_len);
    # a row seeing one tree key with 8 splits, so some chunks are entirely masked.
    ("tree_fp32", torch.float32, 6, 2, 16, 4, [13, 13, 9, 70], 3, 7,
     ([8, 8, 9, 6], [0b10101, 0b11111, 0, 1])),
    ("tree_fp32_many_splits", torch.float32, 6, 2, 16, 4, [70, 40], 8, 8, ([6, 30], [1, (1 << 9) | 1])),
    # An FP8 cache beside bf16 / fp16 queries (widened as loaded), split and not.
    ("fp8kv_gqa9_bf16", torch.bfloat16, 9, 1, 64, 16, [70, 33], 2, 9, None, torch.float8_e4m3fn),
    ("fp8kv_gqa2_fp16", torch.float16, 4, 2, 32, 8, [12, 64, 65], 1, 10, None, torch.float8_e4m3fn),
    # The merge done by each (sequence, KV head)'s last split instead of a second launch:
    # empty chunks and an empty sequence, tree rows with masked chunks, bf16 with padded heads.
    ("fused_gqa4_many_splits", torch.float32, 8, 2, 32, 16, [3, 17, 150], 8, 11, None, None, "fused"),
    ("fused_mha_odd_shapes", torch.float32, 2, 2, 24, 3, [10, 0, 2, 23], 2, 12, None, None, "fused"),
    ("fused_tree_many_splits", torch.float32, 6, 2, 16, 4, [70, 40], 8, 13, ([6, 30], [1, (1 << 9) | 1]), None,
     "fused"),
    ("fused_gqa9_bf16", torch.bfloat16, 9, 1, 64, 16, [70, 33], 3, 14, None, None, "fused"),
]


def _main() -> int:
    return run_cases(CASES, _case)


def test_paged_decode_matches_torch_reference_under_interpreter() -> None:
    pytest.importorskip("triton")
    run_self_interpreted(__file__, timeout=300)


def _inputs(bsz: int = 2, hq: int = 4, hkv: int = 2, d: int = 16, ps: int = 4) -> dict:
    return dict(
        q=torch.randn(bsz, hq, d),
        k_cache=torch.randn(5, ps, hkv, d),
        v_cache=torch.randn(5, ps, hkv, d),
        page_table=torch.ones(bsz, 2, dtype=torch.int32),
        kv_lens=torch.full((bsz,), 3, dtype=torch.int32),
        scale=0.25,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(page_table=torch.ones(2, 2, dtype=torch.int64)), "page_table must be int32"),
        (dict(kv_lens=torch.ones(3, dtype=torch.int32)), "kv_lens must be int32 \\[B=2\\]"),
        (dict(q=torch.randn(2, 3, 16)), "multiple of KV heads"),
        (dict(q=torch.randn(2, 4, 8)), "head dim of q \\(8\\)"),
        (dict(q=torch.randn(2, 4, 16, dtype=torch.float64)), "not supported"),
        (dict(q=torch.randn(2, 4, 16, dtype=torch.bfloat16)), "k_cache and v_cache must both be one of"),
        (dict(q=torch.randn(2, 4, 32)[..., ::2]), "contiguous in its last dim"),
        (dict(v_cache=torch.randn(5, 4, 1, 16)), "differ in shape"),
        (dict(out=torch.empty(2, 4, 8)), "out must be"),
        ({}, "needs CUDA tensors"),
    ],
)
def test_paged_decode_rejects_bad_input(change: dict, message: str) -> None:
    pytest.importorskip("triton")
    from runtime.kernels.paged_decode import paged_decode

    args = _inputs()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        paged_decode(**args)


if __name__ == "__main__":
    sys.exit(_main())
