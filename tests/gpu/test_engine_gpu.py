"""The engine on CUDA: every attention backend and the CUDA-graph decode path against
transformers on the same weights (fp32: identical greedy tokens; bf16: nearly all)."""
from __future__ import annotations

import os

import pytest
import torch

from runtime import Engine, SamplingParams
from runtime.engine.weights import reference_hf_model
from tests.unit.test_engine import PROMPTS, SHARED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def hf_greedy_batch(hf: torch.nn.Module, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq, toks, lps = list(ids), [], []
            for _ in range(n):
                logits = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
                t = int(logits.argmax())
                toks.append(t)
                lps.append(float(torch.log_softmax(logits, -1)[t]))
                seq.append(t)
            out.append((toks, lps))
    return out


def _prompts(tok) -> list[list[int]]:
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return ids + [tok(SHARED + "What is the answer?")["input_ids"], tok(SHARED + "Why is that so?")["input_ids"]]


@pytest.mark.parametrize(
    "backend,graphs",
    [("torch", False), ("triton", False), ("triton", True)],
)
def test_tiny_fp32_cuda_matches_transformers(tiny_model_dir: str, backend: str, graphs: bool) -> None:
    if backend == "triton" and not _has("triton"):
        pytest.skip("triton not installed")
    hf = reference_hf_model(tiny_model_dir, torch.float32).cuda()
    engine = Engine(tiny_model_dir, device="cuda", dtype="float32", attention_backend=backend,
                    cuda_graph=graphs, page_size=4, max_batch_tokens=64)
    prompts = _prompts(engine.tokenizer)
    refs = hf_greedy_batch(hf, prompts, 12)
    results = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0))
    assert (engine.core.runner.graphs is not None) == graphs
    for r, (ref, ref_lp) in zip(results, refs):
        assert r.token_ids == ref
        assert [lp.logprob for lp in r.logprobs] == pytest.approx(ref_lp, abs=1e-3)
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


SMOL = os.environ.get("RUNTIME_TEST_SMOLLM2_DIR")


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_smollm2_bf16_cuda_close_to_transformers(backend: str) -> None:
    if SMOL is None:
        pytest.skip("set RUNTIME_TEST_SMOLLM2_DIR to a converted SmolLM2 folder")
    if not _has(backend):
        pytest.skip(f"{backend} not installed")
    assert_bf16_close(SMOL, 16, attention_backend=backend)


def assert_bf16_close(model_dir: str, n: int, **engine_kwargs) -> None:
    """The engine in bf16 on CUDA against transformers bf16 on the same weights. bf16
    rounding differs between kernels, so a near-tie can flip a later token: most prompts
    must agree fully, and every first token (and its logprob, loosely) must agree."""
    hf = reference_hf_model(model_dir, torch.bfloat16).cuda()
    engine = Engine(model_dir, device="cuda", dtype="bfloat16", **engine_kwargs)
    prompts = _prompts(engine.tokenizer)
    refs = hf_greedy_batch(hf, prompts, n)
    results = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0))
    same = sum(r.token_ids == ref for r, (ref, _) in zip(results, refs))
    assert same >= len(prompts) * 0.7, f"{same}/{len(prompts)} identical"
    for r, (ref, ref_lp) in zip(results, refs):
        assert r.token_ids[0] == ref[0]
        assert r.logprobs[0].logprob == pytest.approx(ref_lp[0], abs=0.1)
    engine.shutdown()
    engine.core.pool.check_no_leak(0)


# flashinfer attention is covered on SmolLM2 (head dim 64) above; with the tiny model's head
# dim 16 it failed on the H200 (2026-11-22), so auto no longer picks it for that size.
@pytest.mark.parametrize("backend,graphs", [("triton", True), ("torch", False)])
def test_tiny_bf16_fused_kernels_close_to_transformers(tiny_model_dir: str, backend: str, graphs: bool) -> None:
    """bf16 on CUDA runs our fused Triton kernels (RMSNorm with the residual add, rotary with
    the KV store, SiLU-and-mul) and the fused q|k|v and gate|up GEMMs; greedy tokens must
    still follow transformers bf16."""
    if backend != "torch" and not _has(backend):
        pytest.skip(f"{backend} not installed")
    assert_bf16_close(tiny_model_dir, 12, attention_backend=backend, cuda_graph=graphs, page_size=4)


@pytest.mark.parametrize("graphs", [False, True])
def test_tree_verification_cuda(tiny_model_dir: str, graphs: bool) -> None:
    """Draft trees verified on CUDA (Triton tree rows; with graphs, replayed) keep greedy
    outputs identical and leak no page."""
    if not _has("triton"):
        pytest.skip("triton not installed")
    from tests.unit.test_speculative import check_draft_trees

    core = check_draft_trees(tiny_model_dir, "cuda", attention_backend="triton", cuda_graph=graphs)
    assert (core.runner.graphs is not None) == graphs


@pytest.mark.parametrize("method", ["ngram"])
def test_speculation_with_graphs_identical(tiny_model_dir: str, method: str) -> None:
    from tests.unit.test_speculative import COPY

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS + [COPY, COPY + " mat. The cat"]
    base = Engine(tiny_model_dir, device="cuda", dtype="float32", attention_backend="triton", page_size=4)
    ref = [r.token_ids for r in base.generate(prompts, params)]
    spec = Engine(tiny_model_dir, device="cuda", dtype="float32", attention_backend="triton", page_size=4,
                  speculative=method, num_draft_tokens=4, speculative_policy="fixed")
    got = spec.generate(prompts, params)
    assert [r.token_ids for r in got] == ref
    assert max(r.accept_length for r in got) > 1.0
    spec.shutdown()
    spec.core.pool.check_no_leak(0)


def test_memory_plan_covers_the_largest_step(tiny_model_dir: str) -> None:
    """The KV pool is sized after profiling the largest step; a mixed batch as large as the
    scheduler admits (decode rows and a long prompt) then allocates no more than the plan kept
    free for it."""
    engine = Engine(tiny_model_dir, device="cuda", dtype="bfloat16", page_size=16, max_batch_tokens=512,
                    max_running=64)
    plan = engine.core.memory_plan
    assert plan is not None and plan.eager_peak > 0 and plan.graph_peak > 0
    assert engine.core.pool.num_pages == plan.num_pages
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 20), generator=g).tolist() + [torch.randint(3, 500, (900,), generator=g).tolist()]
    params = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, logprobs=3, ignore_eos=True)
    results = engine.generate(prompts, params)
    assert all(len(r.token_ids) == 24 for r in results)
    used = torch.cuda.max_memory_allocated() - base
    assert used <= plan.eager_peak + plan.graph_peak + (64 << 20), (used, plan)
    engine.core.scheduler.check_no_leak()
    engine.shutdown()


def test_fp8_kv_cache_triton_graphs_follow_the_torch_path(tiny_model_dir: str) -> None:
    """--kv-cache-dtype fp8_e4m3 on CUDA: the Triton kernels with decode graphs against the
    torch attention path over the same FP8 cache (eager): greedy tokens nearly all equal
    (bf16 rounding differs between the paths)."""
    if not _has("triton"):
        pytest.skip("triton not installed")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS + [SHARED + "What is the answer?"]
    outs = []
    for backend, graphs in (("triton", True), ("torch", False)):
        eng = Engine(tiny_model_dir, device="cuda", dtype="bfloat16", kv_cache_dtype="fp8_e4m3",
                     attention_backend=backend, cuda_graph=graphs, page_size=4)
        assert eng.core.pool.kv.dtype == torch.float8_e4m3fn
        outs.append([r.token_ids for r in eng.generate(prompts, params)])
        eng.shutdown()
    same = sum(a == b for x, y in zip(*outs) for a, b in zip(x, y)) / sum(len(x) for x in outs[0])
    assert same >= 0.8, (same, outs)


@pytest.mark.parametrize("graphs", [True, False])
def test_overlap_schedule_on_cuda_equals_the_plain_schedule(tiny_model_dir: str, graphs: bool) -> None:
    """--overlap-schedule on CUDA (graph replays fed tokens still on the device, the host's
    reads a step behind): the same tokens, stops and logprobs as the plain schedule, greedy
    and seeded sampling, chunked prefill beside decode rows, and no page leaked."""
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=1) for _ in range(5)]
    params += [SamplingParams(max_tokens=20, temperature=0.8, seed=i) for i in range(3)]
    params += [SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[7, 11, 13]) for _ in range(2)]
    runs = []
    for overlap in (False, True):
        eng = Engine(tiny_model_dir, device="cuda", dtype="float32", attention_backend="triton", page_size=4,
                     max_batch_tokens=32, cuda_graph=graphs, overlap_schedule=overlap)
        results = eng.generate(_prompts(eng.tokenizer), params)
        runs.append(results)
        eng.shutdown()
        eng.core.pool.check_no_leak(0)
    plain, got = runs
    assert [(r.token_ids, r.finish_reason) for r in plain] == [(r.token_ids, r.finish_reason) for r in got]
    for a, b in zip(plain, got):  # batches share steps differently: fp32 sums move in the last bits
        assert [lp.logprob for lp in a.logprobs or []] == pytest.approx([lp.logprob for lp in b.logprobs or []],
                                                                          abs=1e-4)


def test_overlap_launch_never_waits_for_the_gpu(tiny_model_dir: str) -> None:
    """The overlap schedule's launch of a step (mixed prefill chunks and decode rows, graphs
    and eager forwards, greedy and sampled rows) queues its work without one host sync: a
    sync there (a copy from pageable memory, an .item()) makes the host wait for the step in
    flight and loses the overlap without changing any output. Checked with torch's sync
    debug mode around every launch, after a first run compiled and captured everything."""
    eng = Engine(tiny_model_dir, device="cuda", dtype="bfloat16", attention_backend="triton", page_size=4,
                 max_batch_tokens=32, overlap_schedule=True)
    prompts = _prompts(eng.tokenizer)
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    eng.generate(prompts, params)  # compiles the kernels, captures the graphs
    core, launch, launches = eng.core, eng.core._launch, []

    def checked(batch):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            launches.append(len(batch.seqs))

    core._launch = checked
    try:
        eng.generate(prompts, params)
    finally:
        core._launch = launch
        eng.shutdown()
    assert len(launches) > 10, launches

