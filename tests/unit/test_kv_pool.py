"""The page-major KV pool: per-layer K/V views with the documented shapes, and every page
one contiguous block of bytes (what the transfer backends move)."""
from __future__ import annotations

import pytest
import torch

from runtime.engine.attention.flashinfer_backend import _check_cache
from runtime.engine.kv_pool import KVPool

LAYERS, PAGES, PS, HKV, D = 3, 6, 4, 2, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_have_the_layer_shape_and_page_stride(dtype: torch.dtype) -> None:
    pool = KVPool(LAYERS, PAGES, PS, HKV, D, dtype, "cpu")
    assert pool.kv.shape == (PAGES, LAYERS, 2, PS, HKV, D) and pool.kv.is_contiguous()
    page_numel = LAYERS * 2 * PS * HKV * D
    for layer in range(LAYERS):
        for view in (pool.k_cache(layer), pool.v_cache(layer)):
            assert view.shape == (PAGES, PS, HKV, D)
            assert view.stride() == (page_numel, HKV * D, D, 1)
            assert view.untyped_storage().data_ptr() == pool.kv.untyped_storage().data_ptr()  # a view, not a copy


def test_each_page_is_one_contiguous_block_of_all_layers() -> None:
    pool = KVPool(LAYERS, PAGES, PS, HKV, D, torch.bfloat16, "cpu")
    per_page = KVPool.bytes_per_page(LAYERS, PS, HKV, D, torch.bfloat16)
    assert pool.page_bytes == per_page == LAYERS * 2 * PS * HKV * D * 2
    base = pool.kv.data_ptr()
    for p in range(PAGES):
        assert pool.kv[p].is_contiguous()
        assert pool.kv[p].data_ptr() == base + p * per_page
        # Every layer's K and V slots of page p fall inside [base + p*B, base + (p+1)*B).
        for layer in range(LAYERS):
            for view in (pool.k_cache(layer), pool.v_cache(layer)):
                first, last = view[p, 0, 0, 0], view[p, -1, -1, -1]
                assert base + p * per_page <= first.data_ptr() and last.data_ptr() + 2 <= base + (p + 1) * per_page
    # Writes through the views land in page p's block, nowhere else.
    slot = torch.tensor([2])
    pool.k_cache(1)[torch.tensor([4]), slot] = torch.ones(1, HKV, D, dtype=torch.bfloat16)
    pool.v_cache(2)[torch.tensor([4]), slot] = torch.full((1, HKV, D), 2.0, dtype=torch.bfloat16)
    assert torch.count_nonzero(pool.kv[4]) == 2 * HKV * D
    assert torch.count_nonzero(pool.kv) == 2 * HKV * D
    assert torch.equal(pool.kv[4, 1, 0, 2], torch.ones(HKV, D, dtype=torch.bfloat16))
    assert torch.equal(pool.kv[4, 2, 1, 2], torch.full((HKV, D), 2.0, dtype=torch.bfloat16))


def test_page_zero_stays_reserved() -> None:
    pool = KVPool(LAYERS, PAGES, PS, HKV, D, torch.float32, "cpu")
    assert pool.total_pages == PAGES - 1
    assert sorted(pool.alloc(PAGES - 1)) == list(range(1, PAGES))


def test_flashinfer_accepts_pool_views_and_refuses_what_it_cannot_address() -> None:
    """The flashinfer backend's stride check (run on meta tensors: no GPU, no memory)."""
    pool = KVPool(LAYERS, PAGES, PS, HKV, D, torch.bfloat16, "cpu")
    _check_cache(pool.k_cache(1), pool.v_cache(1))
    k = pool.k_cache(0)
    with pytest.raises(ValueError, match="equal strides"):
        _check_cache(k, k.contiguous())
    with pytest.raises(ValueError, match="unit stride on head_dim"):
        _check_cache(k.transpose(2, 3), k.transpose(2, 3))
    # A Llama-70B-size page fits flashinfer's 32-bit page stride; a 4 GiB page does not.
    big = torch.empty(2, 80, 2, 16, 8, 128, dtype=torch.bfloat16, device="meta")
    _check_cache(big[:, 0, 0], big[:, 0, 1])
    huge = torch.empty(2, 2**31, dtype=torch.bfloat16, device="meta").as_strided((2, 16, 8, 128), (2**31, 1024, 128, 1))
    with pytest.raises(ValueError, match="too large"):
        _check_cache(huge, huge)


def test_attention_metadata_page_table_rows() -> None:
    """AttentionMetadata.build's page table: row i holds page_lists[i], padded with page 0,
    whether rows share one list object (decode-shape rows of a sequence), repeat its
    contents in another object, or are empty."""
    from runtime.engine.attention.base import AttentionMetadata

    a, b = [3, 1, 4], [5]
    lists = [a, a, [], b, a, [3, 1, 4], b]
    meta = AttentionMetadata.build([1] * len(lists), [4] * len(lists), lists, PS, torch.device("cpu"))
    assert meta.page_table.dtype == torch.int32
    assert meta.page_table.tolist() == [p + [0] * (3 - len(p)) for p in lists]
    assert meta.cu_q_lens.tolist() == list(range(len(lists) + 1))
