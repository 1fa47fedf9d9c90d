"""The sampler against per-row reference implementations and statistical checks (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from runtime.common.sampling_params import SamplingParams
from runtime.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    top_k_top_p_min_p_mask,
    uniform_noise,
)

M64 = (1 << 64) - 1


def _mix_ref(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _noise_ref(seed: int, step: int, n: int, stream: int) -> list[float]:
    """uniform_noise written with Python's unbounded ints: checks the int64 wrap/shift tricks."""
    key = _mix_ref((seed & M64) ^ 0x9E3779B97F4A7C15)
    key = _mix_ref(key ^ step)
    key = _mix_ref(key ^ ((stream * 0xD1B54A32D192ED03) & M64))
    out = []
    for i in range(1, n + 1):
        bits = _mix_ref(key + i * 0x9E3779B97F4A7C15)
        out.append(((bits >> 41) + 0.5) / (1 << 23))
    return out


def _ref_mask(row: torch.Tensor, k: int, p: float, min_p: float) -> torch.Tensor:
    """One row, the obvious way: sort, walk the prefix, in float64."""
    row = row.double()
    v = row.numel()
    if k <= 0 or k > v:
        k = v
    kth = row.sort(descending=True).values[k - 1]
    keep = row >= kth
    probs = torch.softmax(row.masked_fill(~keep, -math.inf), dim=-1)
    kept_p = torch.zeros(v, dtype=torch.bool)
    cum = 0.0
    for i in probs.argsort(descending=True).tolist():
        if not keep[i]:
            break
        kept_p[i] = True
        cum += probs[i].item()
        if cum >= p and p < 1.0:
            break
    keep &= kept_p
    final = torch.softmax(row.masked_fill(~keep, -math.inf), dim=-1)
    keep &= final >= min_p * final.max()
    return row.masked_fill(~keep, -math.inf).float()


def _batch(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    steps: list[int] | None = None,
    vocab: int = 32,
    prompt_out: list[list[int]] | None = None,
    out: list[list[int]] | None = None,
) -> SamplingBatch:
    b = len(params)
    return SamplingBatch.build(
        params,
        seeds if seeds is not None else list(range(b)),
        steps if steps is not None else [0] * b,
        vocab,
        "cpu",
        prompt_and_output_tokens=prompt_out,
        output_tokens=out,
    )


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


CHI2_CRIT_DF7_P001 = 24.322  # chi-square critical value, 7 degrees of freedom, p = 0.001


def test_uniform_noise_matches_python_reference_and_lies_in_open_interval() -> None:
    seeds = [0, 1, 12345, (1 << 63) + 17, -5]
    steps = [0, 7, 1 << 40, 3, 99]
    for stream in (0, 1, 5):
        got = uniform_noise(
            torch.tensor([s if s < (1 << 63) else s - (1 << 64) for s in seeds]),
            torch.tensor(steps),
            6,
            stream,
        )
        assert got.dtype == torch.float32 and got.shape == (5, 6)
        for r, (s, st) in enumerate(zip(seeds, steps)):
            assert got[r].tolist() == pytest.approx(_noise_ref(s, st, 6, stream), abs=0)
    big = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert 0.0 < big.min() and big.max() < 1.0
    assert abs(big.mean().item() - 0.5) < 0.01
    assert not torch.equal(big[0], big[1])


def test_greedy_is_argmax_of_penalised_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 32)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0.0)] * 4))
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.logprobs is None
    # A mixed batch: greedy rows still argmax, whatever the sampled rows do.
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 2
    batch = _batch(params)
    assert not batch.all_greedy
    out = Sampler()(logits, batch)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()
    # repetition_penalty applies under greedy too (HF / vLLM): a huge penalty on the
    # argmax token moves the choice elsewhere.
    top = int(logits[0].argmax())
    pen = _batch([SamplingParams(temperature=0.0, repetition_penalty=100.0)], prompt_out=[[top]])
    assert Sampler()(logits[:1], pen).tokens.item() != top


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [
        (-1, 1.0, 0.0),
        (0, 1.0, 0.0),
        (1, 1.0, 0.0),
        (5, 1.0, 0.0),
        (64, 1.0, 0.0),
        (-1, 0.5, 0.0),
        (-1, 0.9, 0.0),
        (-1, 1e-6, 0.0),
        (-1, 1.0, 0.1),
        (-1, 1.0, 1.0),
        (10, 0.8, 0.05),
        (3, 0.3, 0.5),
    ],
)
def test_filter_mask_matches_per_row_reference(top_k: int, top_p: float, min_p: float) -> None:
    torch.manual_seed(top_k * 7 + int(top_p * 100) + int(min_p * 1000))
    b, v = 6, 64
    logits = torch.randn(b, v) * 3.0  # continuous: ties-free
    got = top_k_top_p_min_p_mask(
        logits,
        torch.full((b,), top_k, dtype=torch.int32),
        torch.full((b,), top_p),
        torch.full((b,), min_p),
    )
    for r in range(b):
        ref = _ref_mask(logits[r], top_k, top_p, min_p)
        assert torch.equal(torch.isinf(got[r]), torch.isinf(ref)), (r, got[r], ref)
        assert torch.equal(got[r][~torch.isinf(ref)], logits[r][~torch.isinf(ref)])
    if top_k == 1 or top_p == 1e-6 or min_p == 1.0:
        assert torch.equal(torch.isfinite(got).sum(-1), torch.ones(b, dtype=torch.int64))
    if top_k in (-1, 0, 64) and top_p == 1.0 and min_p == 0.0:
        assert torch.equal(got, logits)


def test_filter_mask_per_row_parameters_differ() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    ks, ps, mps = [2, -1, 20, 50], [1.0, 0.7, 0.95, 0.2], [0.0, 0.0, 0.2, 0.0]
    got = top_k_top_p_min_p_mask(
        logits, torch.tensor(ks, dtype=torch.int32), torch.tensor(ps), torch.tensor(mps)
    )
    for r in range(4):
        assert torch.equal(got[r], _ref_mask(logits[r], ks[r], ps[r], mps[r]))


def test_top_k_keeps_ties_with_kth_value() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    got = top_k_top_p_min_p_mask(
        logits, torch.tensor([2], dtype=torch.int32), torch.tensor([1.0]), torch.tensor([0.0])
    )
    assert torch.isfinite(got).tolist() == [[True, False, True, True, False]]


def test_penalties_match_per_row_reference() -> None:
    torch.manual_seed(2)
    v = 16
    logits = torch.randn(3, v) * 2.0
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(frequency_penalty=-1.0),
    ]
    prompt = [[1, 2, 3], [4, 4, 5], [6]]
    outputs = [[2, 7, 7, 7], [5, 9], [6, 6, 11]]
    seen = [p + o for p, o in zip(prompt, outputs)]
    batch = _batch(params, vocab=v, prompt_out=seen, out=outputs)
    got = apply_penalties(logits, batch)
    for r, p in enumerate(params):
        ref = logits[r].clone()
        for t in set(seen[r]):
            x = ref[t].item()
            ref[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[r]):
            ref[t] -= p.frequency_penalty * outputs[r].count(t) + p.presence_penalty
        assert torch.allclose(got[r], ref, atol=1e-6), r
    # No penalty at all: nothing built, logits untouched.
    plain = _batch([SamplingParams()] * 3, vocab=v)
    assert plain.output_counts is None and plain.seen_mask is None
    assert apply_penalties(logits, plain) is logits


def test_advance_matches_rebuild() -> None:
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)] * 2
    prompt, outs = [[1, 2], [3]], [[4], []]
    seen = [p + o for p, o in zip(prompt, outs)]
    batch = _batch(params, steps=[1, 0], vocab=8, prompt_out=seen, out=outs)
    batch.advance(torch.tensor([4, 3]))
    outs2 = [[4, 4], [3]]
    seen2 = [p + o for p, o in zip(prompt, outs2)]
    fresh = _batch(params, steps=[2, 1], vocab=8, prompt_out=seen2, out=outs2)
    assert torch.equal(batch.step, fresh.step)
    assert torch.equal(batch.output_counts, fresh.output_counts)
    assert torch.equal(batch.seen_mask, fresh.seen_mask)


def test_penalty_without_token_history_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="repetition_penalty"):
        _batch([SamplingParams(repetition_penalty=1.1)])
    with pytest.raises(ValueError, match="frequency"):
        _batch([SamplingParams(frequency_penalty=1.0)])


def test_seeded_sampling_is_independent_of_batch_position_and_composition() -> None:
    torch.manual_seed(3)
    v = 100
    req_logits = {s: torch.randn(v) * 0.5 for s in (11, 22, 33, 44)}  # flat: many candidates
    req_params = {
        11: SamplingParams(temperature=1.0, seed=11),
        22: SamplingParams(temperature=0.7, top_p=0.9, seed=22),
        33: SamplingParams(temperature=1.3, top_k=20, seed=33),
        44: SamplingParams(temperature=0.0),
    }
    req_step = {11: 5, 22: 0, 33: 17, 44: 2}

    def run(order: list[int]) -> dict[int, int]:
        batch = _batch(
            [req_params[s] for s in order], [s for s in order], [req_step[s] for s in order], v
        )
        tokens = Sampler()(torch.stack([req_logits[s] for s in order]), batch).tokens
        return {s: int(t) for s, t in zip(order, tokens)}

    a = run([11, 22, 33, 44])
    assert a == run([11, 22, 33, 44])  # reproducible across calls
    b = run([33, 11, 44, 22])
    c = run([22, 33])
    d = run([11])
    assert a == b
    assert all(a[s] == c[s] for s in c) and a[11] == d[11]


def test_different_seeds_and_steps_give_different_streams() -> None:
    v, n = 50, 64
    logits = torch.zeros(n, v)  # uniform: every draw is a fresh token from 50
    params = [SamplingParams(temperature=1.0)] * n
    steps = list(range(n))
    seq1 = Sampler()(logits, _batch(params, [1] * n, steps, v)).tokens
    seq2 = Sampler()(logits, _batch(params, [2] * n, steps, v)).tokens
    assert (seq1 != seq2).sum() > n // 2  # equal w.p. 1/50 per step if independent
    assert len(set(seq1.tolist())) > 20  # steps advance the stream
    # Streams at one step are independent noise as well.
    s0 = uniform_noise(torch.tensor([7]), torch.tensor([3]), 16, stream=0)
    s1 = uniform_noise(torch.tensor([7]), torch.tensor([3]), 16, stream=1)
    assert not torch.equal(s0, s1)


def _sample_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """One request, `draws` consecutive steps, sampled in a single batched call."""
    v = logits_row.numel()
    batch = _batch([params] * draws, [1234] * draws, list(range(draws)), v)
    tokens = Sampler()(logits_row.expand(draws, v).contiguous(), batch).tokens
    return torch.bincount(tokens, minlength=v)


def test_sampled_frequencies_match_softmax_chi_square() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    counts = _sample_counts(logits, SamplingParams(temperature=1.0), 20000)
    stat = _chi_square(counts, torch.softmax(logits, -1))
    assert stat < CHI2_CRIT_DF7_P001, stat
    # The test has power: the same draws are far from the T = 2 distribution.
    assert _chi_square(counts, torch.softmax(logits / 2.0, -1)) > 10 * CHI2_CRIT_DF7_P001
    # Across seeds at a fixed step, too.
    batch = _batch([SamplingParams()] * 20000, list(range(20000)), [0] * 20000, 8)
    tokens = Sampler()(logits.expand(20000, 8).contiguous(), batch).tokens
    stat = _chi_square(torch.bincount(tokens, minlength=8), torch.softmax(logits, -1))
    assert stat < CHI2_CRIT_DF7_P001, stat


def test_temperature_and_filters_shape_the_sampled_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    params = SamplingParams(temperature=0.6, top_k=4, top_p=0.9)
    counts = _sample_counts(logits, params, 20000)
    target = torch.softmax(_ref_mask(logits / 0.6, 4, 0.9, 0.0), -1)
    support = target > 0
    assert counts[~support].sum() == 0
    df = int(support.sum()) - 1
    stat = _chi_square(counts[support], target[support])
    crit = {1: 10.83, 2: 13.82, 3: 16.27}[df]  # p = 0.001
    assert stat < crit, (stat, df)


def test_probs_is_the_sampled_distribution() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 20)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5, min_p=0.1),
        SamplingParams(temperature=1.0, top_p=0.5, frequency_penalty=1.0),
    ]
    batch = _batch(params, vocab=20, prompt_out=None, out=[[], [], [3, 3]])
    probs = Sampler().probs(logits, batch)
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), 20).float())
    ref1 = torch.softmax(_ref_mask(logits[1] / 0.8, 5, 1.0, 0.1), -1)
    assert torch.allclose(probs[1], ref1, atol=1e-6)
    pen = logits[2].clone()
    pen[3] -= 2.0
    assert torch.allclose(probs[2], torch.softmax(_ref_mask(pen, -1, 0.5, 0.0), -1), atol=1e-6)
    for step in range(30):  # every sampled token lies in the support of probs
        batch.step.fill_(step)
        tokens = Sampler()(logits, batch).tokens
        assert (probs.gather(1, tokens[:, None]) > 0).all()


def test_logprobs_are_of_the_raw_model_distribution() -> None:
    torch.manual_seed(5)
    v = 40
    logits = torch.randn(4, v) * 2.0
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, top_k=3, logprobs=5),
        SamplingParams(temperature=1.0),
    ]
    batch = _batch(params, vocab=v, prompt_out=[[1, 2], [], [], []])
    assert batch.num_logprobs == 5
    out = Sampler()(logits, batch)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.tokens[:, None]).squeeze(1))
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids[:, 0], logits.argmax(-1))
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_ids))
    # Nothing beyond the top-K is more likely than the K-th.
    rest = raw.scatter(1, out.top_ids, -math.inf)
    assert (rest.max(-1).values <= out.top_logprobs[:, -1]).all()
    # logprobs=0 for everyone: chosen-token logprob only.
    only = Sampler()(logits, _batch([SamplingParams(logprobs=0)] * 4, vocab=v))
    assert only.logprobs is not None and only.top_ids is None


def test_build_normalises_parameters() -> None:
    params = [
        SamplingParams(top_k=-1),
        SamplingParams(top_k=0, temperature=1e-7),
        SamplingParams(top_k=1000, logprobs=2),
        SamplingParams(top_k=7, min_p=0.2),
    ]
    batch = _batch(params, seeds=[1, 2, (1 << 64) - 1, 4], vocab=100)
    assert batch.top_k.tolist() == [100, 100, 100, 7]
    assert batch.temperature.tolist()[1] == 0.0  # too small to divide by: greedy
    assert batch.seed.tolist()[2] == -1
    assert batch.num_logprobs == 2 and not batch.all_greedy
    assert batch.use_top_k_top_p and batch.use_min_p
    plain = _batch([SamplingParams()] * 2, vocab=100)
    assert plain.num_logprobs == -1 and not plain.use_top_k_top_p and not plain.use_min_p
    assert _batch([SamplingParams(temperature=0.0)], vocab=100).all_greedy
    with pytest.raises(ValueError, match="one entry per request"):
        SamplingBatch.build(params, [1], [0] * 4, 100, "cpu")
