"""train-draft's serving accept length: greedy serving drafts only where a step begins
(first generated pair, then p + a(p), ...), so its mean differs from the per-position one."""
from __future__ import annotations

import torch

from runtime.engine.speculative.train_draft import serving_walk


def test_walk_follows_steps_not_positions() -> None:
    # Row 0 from pair 0: steps at 0 (+3), 3 (+2), 5 (+1); pair 6 has no score: 3 steps, 6 tokens.
    # Row 1 from pair 2 (the 9s are prompt pairs, never drafted from): steps at 2 (+2), 4, 5, 6,
    # each +1, then pair 7 is unscored: 4 steps, 5 tokens.
    # Row 2 from pair 1: a step at 1 (+5) jumps past the last scored pair (5): 1 step, 5 tokens.
    acc = torch.tensor([[3, 1, 1, 2, 6, 1, 0, 0],
                        [9, 9, 2, 6, 1, 1, 1, 0],
                        [0, 5, 1, 1, 1, 1, 0, 0]])
    first = torch.tensor([0, 2, 1])
    tokens, steps = serving_walk(acc, first)
    assert (tokens, steps) == (16, 8)
    # The per-position mean over the generated pairs is 34 / 16: the walk skips the 6s.
    generated = (torch.arange(8)[None, :] >= first[:, None]) & (acc > 0)
    assert acc[generated].sum().item() / generated.sum().item() == 34 / 16 != tokens / steps


def test_walk_ends_at_the_row_end_and_skips_unscored_rows() -> None:
    # The last step lands exactly on the row end; a row whose first pair has no score
    # (too few generated tokens for k drafts) takes no step.
    acc = torch.tensor([[2, 1, 3, 7, 7], [0, 0, 0, 0, 0]])
    assert serving_walk(acc, torch.tensor([0, 1])) == (5, 2)


# ---- the prompts ----------------------------------------------------------------------------
def test_held_out_topics_cover_the_benchmark_and_no_template() -> None:
    import importlib.util
    import itertools
    import pathlib

    from runtime.engine.speculative import train_prompts as tp

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_spec.py"
    spec = importlib.util.spec_from_file_location("bench_spec", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert all(tp.mentions_held_out(p) for p in bench.CHAT)
    assert not any(tp.mentions_held_out(t.format(s=s)) for t, s in itertools.product(tp.TEMPLATES, tp.SUBJECTS))
    # Whole words, plurals included; no match inside another word.
    assert tp.mentions_held_out("How do Airplanes fly?") and tp.mentions_held_out("the seas")
    assert not tp.mentions_held_out("binary search") and not tp.mentions_held_out("marketing plans")


def test_keep_self_written_filters() -> None:
    from runtime.engine.speculative.train_prompts import keep_self_written

    seen: set[str] = set()
    assert keep_self_written("  How do I start a garden?\n", True, seen) == "How do I start a garden?"
    assert keep_self_written("How do I start a garden?", True, seen) is None  # a repeat
    assert keep_self_written("Explain how compilers work", False, seen) is None  # cut at the token limit
    assert keep_self_written("Hi there", True, seen) is None  # too short
    assert keep_self_written("Why do vaccines need boosters?", True, seen) is None  # a held-out topic


def test_self_written_prompts_come_from_the_user_turn(tiny_model_dir: str, monkeypatch) -> None:
    """The target samples user turns from its user-turn prefix (a real engine run, no page
    leaked); what comes back is decoded and filtered: a turn that ended on its own is
    kept once, a cut, repeated, too short or held-out one is not. The tiny random model
    seldom ends a turn, so the filtering is checked on outputs fed in."""
    from runtime import Engine
    from runtime.engine.speculative import train_prompts
    from runtime.engine.speculative.train_draft import self_written_prompts

    engine = Engine(tiny_model_dir, device="cpu", dtype="float32", seed=0)
    try:
        tok = engine.tokenizer
        prefix = train_prompts.user_turn_prefix(tok)
        assert tok.decode(prefix) == "<|im_start|>user\n"  # the tiny ChatML template has no system turn
        calls = []
        real = train_prompts.generate

        def spy(core, prompts, params, desc):
            calls.append((prompts, params))
            return real(core, prompts, params, desc)

        monkeypatch.setattr(train_prompts, "generate", spy)
        texts = self_written_prompts(engine.core, tok, 12, seed=0, temperature=1.0)
        prompts, params = calls[0]
        assert len(prompts) >= 12 and all(p == prefix for p in prompts)
        assert all(q.temperature == 1.0 and q.top_p == 0.95 for q in params)
        assert len({q.seed for q in params}) == len(params)
        assert len(texts) <= 12 and not engine.core.requests and not engine.core.has_work
        engine.core.scheduler.check_no_leak()

        eos = next(iter(engine.core.eos_ids))
        said = ["How do I start a garden?", "Explain how compilers work", "How do I start a garden?",
                "Why do vaccines need boosters?", "Hi there", "What makes a good bicycle helmet?"]
        ended = [True, False, True, True, True, True]
        outs = [list(tok(t, add_special_tokens=False)["input_ids"]) + ([eos] if e else []) for t, e in zip(said, ended)]
        monkeypatch.setattr(train_prompts, "generate", lambda core, prompts, params, desc: outs[: len(prompts)])
        assert self_written_prompts(engine.core, tok, 4, seed=0, temperature=1.0) == [
            "How do I start a garden?", "What makes a good bicycle helmet?"]
        assert self_written_prompts(engine.core, tok, 1, seed=0, temperature=1.0) == ["How do I start a garden?"]
    finally:
        engine.shutdown()
    engine.core.pool.check_no_leak(0)
