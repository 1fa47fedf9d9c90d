"""`runtime train-draft`: train an EAGLE head (see eagle.py) for a target model by
self-distillation, with no labelled data.

1. Varied prompts (train_prompts.py), chat-templated when the tokenizer has a template: a
   `--self-prompts` fraction written by the target itself from its user-turn prefix, the
   rest from templates.
2. Continuations from the target itself with `runtime.Engine`: a `--greedy-fraction` of
   the training prompts greedily (what greedy serving shows the head), the rest sampled at
   `--temperature` (variety); the held-out prompts are all greedy, so that the simulated
   accept lengths in (5) are exact for greedy serving.
3. Features: one plain forward of transformers' model over each whole sequence;
   `last_hidden_state` is the final RMSNorm's output, the same tensor our engine hands to
   the drafter (tests/unit/test_eagle.py checks the two agree).
4. Training under the serving regime: pairs (x_p, f_{p-1}) for every position p >= 1 of
   prompt and continuation, causal attention over all of them (the drafter's context holds
   the prompt too). The loss counts the pairs of generated tokens only (p >= L): those are
   where the drafter drafts; prompt pairs are context. This is EAGLE's choice too (loss on
   the assistant's tokens), and keeps the one-layer head's capacity on the text it has to
   predict rather than on guessing the user's next word. A `--prefix-drop` fraction of the
   sequences start their context at a random prompt position instead: after a prefix-cache
   hit (a shared system prompt) the served context starts there too. Step 0 is
   teacher-forced; steps j = 1 .. train_depth-1 unroll the drafter's own later steps (the
   real next token with the head's own predicted feature, attending real pairs up to p and
   its own earlier steps: EAGLE-3's "training-time test"), so that the head learns to
   continue from its own features, which is what drafting at depth >= 2 does. Per step the
   loss is feature_weight * SmoothL1(f^, f) + token_weight * CE(lm_head(f^),
   softmax(lm_head(f))), with weight 0.8^j (later steps only matter once earlier drafts
   were accepted). AdamW, linear warmup and cosine decay, bf16 autocast on GPU.
5. Validation on the greedy held-out sequences, from every generated position: top-1 (the
   head's argmax == the target's next token), and the accept length of a chain of
   `--eval-k` drafts and of the `--eval-tree` tree, built with simulate.py, which drafts
   exactly as EagleDrafter does (tests check the two agree; over the `--draft-vocab`
   tokens when one is chosen, the most generated ones): 1 + the depth of the deepest
   draft whose path matches the target's continuation. Two means: per position (a draft
   from every generated position), and per serving step (`serving_walk`): greedy serving
   drafts only where a step begins, from the first generated position p to p + a(p) and
   so on, so positions inside long accepted runs weigh less there.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.config import EngineConfig
from runtime.engine.speculative.eagle_head import EagleHead, save_head
from runtime.engine.speculative.simulate import Batch, DraftKV, accept_lengths, context, draft_step, draft_trees
from runtime.engine.speculative.train_prompts import generate, make_prompts, self_written_prompts
from runtime.engine.model import LlamaForCausalLM
from runtime.engine.weights import LoadedModel

log = logging.getLogger("runtime.train_draft")

__all__ = ["Sample", "collate", "main", "make_prompts", "prompt_ids", "self_written_prompts", "serving_walk"]


def prompt_ids(engine, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, chat-templated when the tokenizer has a template."""
    if getattr(engine.tokenizer, "chat_template", None):
        return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [list(engine.tokenizer(t)["input_ids"]) for t in texts]


@dataclass
class Sample:
    """One sequence x_0 .. x_{n-1}: a prompt of L tokens and its continuation."""

    tokens: torch.Tensor  # int64 [n-1] CPU: x_1 .. x_{n-1}, the pairs' tokens
    feats: torch.Tensor  # [n, H] device: f_0 .. f_{n-1}
    prompt_len: int  # L


def collate(samples: list[Sample], device: torch.device, skips: list[int] | None = None) -> Batch:
    """Pair t of a row is (x_{t+1+m}, f_{t+m}) at position t + 1 + m, where m = skips[i]
    leading pairs are left out of the context (default none); right-padded."""
    skips = skips or [0] * len(samples)
    b, t = len(samples), max(len(s.tokens) - m for s, m in zip(samples, skips))
    tokens = torch.zeros(b, t, dtype=torch.int64)
    for i, (s, m) in enumerate(zip(samples, skips)):
        tokens[i, : len(s.tokens) - m] = s.tokens[m:]
    feats = torch.nn.utils.rnn.pad_sequence([s.feats[m:].to(device) for s, m in zip(samples, skips)],
                                            batch_first=True)  # [B, T+1, H]
    lens = torch.tensor([len(s.tokens) - m for s, m in zip(samples, skips)], device=device)
    first = torch.tensor([s.prompt_len - 1 - m for s, m in zip(samples, skips)], device=device)  # the pair of x_L
    skip = torch.tensor(skips, device=device)
    positions = skip[:, None] + torch.arange(1, t + 1, device=device)[None, :]
    return Batch(tokens.to(device), feats[:, :-1], feats[:, 1:], positions, lens, first)


def batches(samples: list[Sample], size: int, device: torch.device, rng: random.Random | None,
            prefix_drop: float = 0.0) -> Iterator[Batch]:
    """Batches of `size` sequences. Shuffled with `rng`: sequences of similar length go
    together (sorted within windows of 16 batches), batches in random order, and with
    probability `prefix_drop` a sequence's context starts at a random prompt position
    (serving's context starts after a prefix-cache hit, e.g. a shared system prompt)."""
    order = list(range(len(samples)))
    if rng is not None:
        rng.shuffle(order)
        window = 16 * size
        order = [j for i in range(0, len(order), window)
                 for j in sorted(order[i : i + window], key=lambda j: len(samples[j].tokens))]
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(groups)
    for g in groups:
        skips = [rng.randrange(samples[j].prompt_len) if rng is not None and rng.random() < prefix_drop else 0
                 for j in g]
        yield collate([samples[j] for j in g], device, skips)


# ---- data ------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(hf_model: torch.nn.Module, seqs: list[tuple[list[int], list[int]]], batch_size: int,
                     device: torch.device, desc: str) -> list[Sample]:
    """The target's final hidden states over each whole (prompt, output), one forward per
    batch of sequences (right-padded; causal attention keeps padding out of real rows).
    Sequences with fewer than 2 generated tokens have nothing to draft and are left out."""
    out: list[Sample | None] = [None] * len(seqs)
    keep = [i for i, (_, o) in enumerate(seqs) if len(o) >= 2]
    order = sorted(keep, key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for i in tqdm(range(0, len(order), batch_size), desc=f"features ({desc})", unit="batch"):
        idx = order[i : i + batch_size]
        full = [seqs[j][0] + seqs[j][1] for j in idx]
        n = max(map(len, full))
        ids = torch.zeros(len(full), n, dtype=torch.int64)
        mask = torch.zeros(len(full), n, dtype=torch.int64)
        for r, f in enumerate(full):
            ids[r, : len(f)] = torch.tensor(f)
            mask[r, : len(f)] = 1
        hidden = hf_model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, j in enumerate(idx):
            out[j] = Sample(torch.tensor(full[r][1:]), hidden[r, : len(full[r])].clone(), len(seqs[j][0]))
    return [s for s in out if s is not None]


def draft_vocabulary(samples: list[Sample], size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` tokens the target generated most often in `samples` (sorted ids, int64)
    and the fraction of generated tokens they cover: a draft can only be accepted when its
    token is in the draft vocabulary, so coverage bounds what a smaller one costs."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in samples:
        counts += torch.bincount(s.tokens[s.prompt_len - 1 :], minlength=vocab_size)
    size = min(size, vocab_size)
    ids = counts.topk(size).indices.sort().values
    return ids, counts[ids].sum().item() / max(1, counts.sum().item())


# ---- training and validation -----------------------------------------------------------------
def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)


def _step_loss(pred: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, feature_weight: float,
               token_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, tgt [M, H] -> (loss, top-1 agreement with the target's argmax)."""
    floss = F.smooth_l1_loss(pred.float(), tgt.float())
    logits = F.linear(pred, w).float()
    with torch.no_grad():
        tprob = F.linear(tgt.to(pred.dtype), w).float().softmax(-1)
    tloss = -(tprob * logits.log_softmax(-1)).sum(-1).mean()
    top1 = (logits.argmax(-1) == tprob.argmax(-1)).float().mean()
    return feature_weight * floss + token_weight * tloss, top1.detach()


def train_loss(head: EagleHead, target: LlamaForCausalLM, b: Batch, depth: int, feature_weight: float,
               token_weight: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss of the teacher-forced pass and depth-1 unrolled draft steps (see the module
    docstring, 4), and each step's top-1 (device scalars)."""
    w = target.lm_head.weight
    ctx = context(head, target, b)
    pred, kv = ctx.feat, DraftKV()
    total = pred.new_zeros((), dtype=torch.float32)
    top1: list[torch.Tensor] = []
    bsz, t, _ = pred.shape
    for j in range(depth):
        if j:
            # Step j after pair t: the real x_{p+j} with the head's f^_{p+j-1}, seeing the
            # real pairs <= t and its own steps 1..j (slots 0..j-1).
            x = head.project(target.model.embed_tokens(b.shifted(b.tokens, j)), pred)[:, :, None]
            bits = torch.full((bsz, t, 1), (1 << j) - 1, dtype=torch.int64, device=x.device)
            pred = draft_step(head, ctx, kv, x, b.positions + j, bits)[:, :, 0]
        mask = b.valid(j)
        loss, acc = _step_loss(pred[mask], b.shifted(b.feat_out, j)[mask], w, feature_weight, token_weight)
        total = total + 0.8**j * loss
        top1.append(acc)
    return total, top1


def serving_walk(acc: torch.Tensor, first: torch.Tensor) -> tuple[int, int]:
    """The steps greedy serving takes: acc int64 [B, T], the accept length of a draft after
    each pair (0 where a draft can't be scored: before `first`, or without all k next
    tokens), first int64 [B]. Per row a step at pair t gains acc[t] tokens and the next
    one begins at t + acc[t]; the walk starts at first and ends at a pair with no score.
    Returns (tokens gained, steps) summed over the rows."""
    tokens = steps = 0
    for row, t in zip(acc.tolist(), first.tolist()):
        while 0 <= t < len(row) and row[t] > 0:
            tokens += row[t]
            steps += 1
            t += row[t]
    return tokens, steps


@torch.no_grad()
def evaluate(head: EagleHead, target: LlamaForCausalLM, samples: list[Sample], batch_size: int, k: int,
             tree: tuple[int, int] | None, device: torch.device) -> dict[str, float]:
    """Top-1, accept lengths of the chain of k drafts and of the tree (branch, nodes) of
    depth k (per position, and per serving step: see `serving_walk`), and how often the
    target's argmax over the extracted features agrees with the generated (greedy) token:
    near 1 when the features are the ones the engine sees."""
    was_training = head.training
    head.eval()
    w = target.lm_head.weight
    sums = dict(top1=0.0, agree=0.0, n1=0.0, chain=0.0, tree=0.0, nk=0.0)
    walks = dict(chain=[0, 0], tree=[0, 0])  # tokens gained, steps
    for b in batches(samples, batch_size, device, None):
        with _autocast(device, w.dtype):
            chain, chain_par = draft_trees(head, target, b, k)  # [B, T, k]
            tgt_argmax = torch.cat([F.linear(f.to(w.dtype), w).argmax(-1)[None] for f in b.feat_out])
            trees = draft_trees(head, target, b, k, *tree) if tree else None
        nxt = b.shifted(b.tokens, 1)
        has_next = b.valid(1)
        sums["top1"] += (chain[..., 0] == nxt)[has_next].sum().item()
        sums["agree"] += (tgt_argmax == nxt)[has_next].sum().item()
        sums["n1"] += has_next.sum().item()
        want = torch.stack([b.shifted(b.tokens, j) for j in range(1, k + 1)], -1)  # [B, T, k]
        full = b.valid(k)  # all k next tokens exist
        for name, drafts in (("chain", (chain, chain_par)), ("tree", trees)):
            if drafts is None:
                continue
            tok, par = drafts
            acc = torch.zeros_like(b.tokens)  # int64 [B, T]: 0 where not scored
            acc[full] = accept_lengths(tok[full], par[full], want[full])
            sums[name] += acc.sum().item()
            gained, steps = serving_walk(acc, b.first)
            walks[name][0] += gained
            walks[name][1] += steps
        sums["nk"] += full.sum().item()
    head.train(was_training)
    nk = sums["nk"] or float("nan")
    out = {"top1": sums["top1"] / max(sums["n1"], 1), f"accept_length_k{k}": sums["chain"] / nk,
           f"serving_accept_length_k{k}": walks["chain"][0] / (walks["chain"][1] or float("nan")),
           "target_agreement": sums["agree"] / max(sums["n1"], 1), "positions": sums["n1"],
           "serving_steps": walks["chain"][1]}
    if tree:
        name = f"tree{tree[0]}x{tree[1]}_k{k}"
        out[f"accept_length_{name}"] = sums["tree"] / nk
        out[f"serving_accept_length_{name}"] = walks["tree"][0] / (walks["tree"][1] or float("nan"))
    return out


def train(head: EagleHead, target: LlamaForCausalLM, train_set: list[Sample],
          a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    steps_per_epoch = math.ceil(len(train_set) / a.batch_size)
    total = max(1, steps_per_epoch * a.epochs)
    warmup = max(1, round(total * a.warmup))
    opt = torch.optim.AdamW(head.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine down to 5%
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.475 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(a.seed)
    head.train()
    recent: list[torch.Tensor] = []  # per-step [loss, top1 per depth], read every few steps (host syncs)
    stats: dict[str, float] = {}
    with tqdm(total=total, desc="train", unit="step") as bar:
        for epoch in range(a.epochs):
            for b in batches(train_set, a.batch_size, device, rng, a.prefix_drop):
                with _autocast(device, target.lm_head.weight.dtype):
                    loss, top1 = train_loss(head, target, b, a.train_depth, a.feature_weight, a.token_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                sched.step()
                recent.append(torch.stack([loss.detach(), *top1]))
                bar.update(1)
                if len(recent) == 25 or bar.n == total:
                    mean = torch.stack(recent).mean(0).tolist()
                    recent.clear()
                    stats = {"loss": mean[0], "top1": mean[1], **{f"top1_step{j}": v for j, v in enumerate(mean[2:], 1)}}
                    bar.set_postfix(epoch=epoch, loss=f"{mean[0]:.3f}", top1=f"{mean[1]:.3f}")
    return {f"train_{k}": v for k, v in stats.items()}


# ---- the command -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runtime train-draft",
                                description="Train an EAGLE draft head for `--speculative eagle` by self-distillation.")
    p.add_argument("--model", default=None, help="HF folder of the target (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder to write the head to (pass it as --draft-model)")
    p.add_argument("--num-prompts", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps spent warming up")
    p.add_argument("--train-depth", type=int, default=2,
                   help="draft steps trained per position (1: teacher forcing only; more: unrolled on the head's own features)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--self-prompts", type=float, default=0.5,
                   help="fraction of the prompts written by the target itself (needs a chat template; the rest "
                        "come from templates)")
    p.add_argument("--prompt-temperature", type=float, default=0.9, help="sampling temperature of self-written prompts")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the sampled training data")
    p.add_argument("--greedy-fraction", type=float, default=0.5, help="training prompts decoded greedily")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="prompts held out (decoded greedily)")
    p.add_argument("--prefix-drop", type=float, default=0.3,
                   help="fraction of training sequences whose context starts at a random prompt position")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the SmoothL1 feature loss")
    p.add_argument("--token-weight", type=float, default=0.5, help="weight of the cross-entropy token loss")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="score drafts over only the N tokens the target generates most (EAGLE-3's draft vocabulary: "
                        "a cheaper lm_head per draft step); 0: the whole vocabulary")
    p.add_argument("--eval-k", type=int, default=6, help="draft depth of the simulated accept lengths")
    p.add_argument("--eval-tree", default="6x32", help="tree (BxN, as --speculative-tree) of the simulated tree "
                                                      "accept length, or 'chain' to skip it")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per validation batch")
    a = p.parse_args(argv)
    if a.num_prompts < 2:
        p.error("--num-prompts must be at least 2 (one is held out for validation)")
    if a.draft_vocab < 0:
        p.error("--draft-vocab must be >= 0 (0: the whole vocabulary)")
    if a.max_new_tokens < 2 or a.epochs < 1 or a.batch_size < 1 or a.lr <= 0 or a.train_depth < 1 or a.eval_k < 1:
        p.error("--max-new-tokens >= 2, --epochs >= 1, --batch-size >= 1, --lr > 0, --train-depth >= 1 "
                "and --eval-k >= 1 are required")
    if (not 0.0 < a.val_fraction < 1.0 or not 0.0 <= a.greedy_fraction <= 1.0 or not 0.0 <= a.warmup < 1.0
            or not 0.0 <= a.prefix_drop <= 1.0 or not 0.0 <= a.self_prompts <= 1.0 or a.prompt_temperature <= 0):
        p.error("--val-fraction must be in (0, 1), --greedy-fraction, --prefix-drop and --self-prompts in [0, 1], "
                "--warmup in [0, 1), --prompt-temperature > 0")
    try:  # the serving config's own check of a tree's shape
        a.tree = EngineConfig(speculative="eagle", speculative_tree=a.eval_tree, num_draft_tokens=a.eval_k).draft_tree
    except ValueError as e:
        p.error(f"--eval-tree / --eval-k: {e}")
    return a


def build_data(a: argparse.Namespace, timings: dict[str, float]) -> tuple[LoadedModel, list[Sample], list[Sample]]:
    """Generate with the engine, then extract features with transformers. Returns the
    target (for its embedding and lm_head), the training and the validation samples."""
    from runtime import Engine, SamplingParams
    from runtime.engine.weights import reference_hf_model

    t0 = time.time()
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    # The engine's KV pool must leave room for the transformers model and training. Waves
    # of 256 requests, all of them in the decode CUDA graphs.
    engine = Engine(a.model, device="cuda" if cuda else "cpu", dtype=a.dtype, seed=a.seed, kv_mem_fraction=0.4,
                    max_running=256, cuda_graph_max_batch=256)
    loaded = engine.core.loaded
    if os.path.isfile(loaded.path):
        raise ValueError(f"{loaded.path} is not a Hugging Face folder: features come from transformers")
    texts = self_written_prompts(engine.core, engine.tokenizer, round(a.num_prompts * a.self_prompts), a.seed,
                                 a.prompt_temperature)
    texts += make_prompts(a.num_prompts - len(texts), a.seed)  # templates fill up what was not kept
    random.Random(a.seed).shuffle(texts)  # both kinds in the validation set
    ids = prompt_ids(engine, texts)
    n_val = max(1, round(a.num_prompts * a.val_fraction))
    n_greedy = n_val + round((a.num_prompts - n_val) * a.greedy_fraction)
    room = engine.core.max_model_len - 1
    params = [
        SamplingParams(max_tokens=max(1, min(a.max_new_tokens, room - len(p))),
                       temperature=0.0 if i < n_greedy else a.temperature, seed=a.seed * 1_000_003 + i)
        for i, p in enumerate(ids)
    ]
    outputs = generate(engine.core, ids, params, f"{len(ids) - n_val} train + {n_val} greedy validation")
    engine.shutdown()
    del engine
    gc.collect()
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    timings["generate_s"] = time.time() - t0
    t0 = time.time()
    hf = reference_hf_model(loaded.path, loaded.dtype).to(device)
    seqs = list(zip(ids, outputs))
    fbs = max(8, 2 * a.batch_size)
    val_set = extract_features(hf, seqs[:n_val], fbs, device, "validation")
    train_set = extract_features(hf, seqs[n_val:], fbs, device, "train")
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    timings["features_s"] = time.time() - t0
    return loaded, train_set, val_set


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    t_start = time.time()
    timings: dict[str, float] = {}
    torch.manual_seed(a.seed)
    try:
        loaded, train_set, val_set = build_data(a, timings)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"runtime train-draft: error: {e}", file=sys.stderr)
        return 2
    target, device = loaded.model, loaded.device
    n_train_tok = sum(len(s.tokens) - s.prompt_len + 1 for s in train_set)
    log.info("data: %d training sequences (%d generated tokens), %d validation sequences",
             len(train_set), n_train_tok, len(val_set))
    if not train_set or not val_set:
        print("runtime train-draft: error: the model generated too few tokens to train on", file=sys.stderr)
        return 2

    head = EagleHead.for_target(target)
    coverage = None
    if a.draft_vocab:
        head.draft_ids, coverage = draft_vocabulary(train_set, a.draft_vocab, target.config.vocab_size)
        log.info("draft vocabulary: %d tokens cover %.2f%% of the generated training tokens", a.draft_vocab,
                 100 * coverage)
    t0 = time.time()
    train_stats = train(head, target, train_set, a, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings["train_s"] = time.time() - t0
    t0 = time.time()
    val = evaluate(head, target, val_set, a.eval_batch_size, a.eval_k, a.tree, device)
    timings["eval_s"] = time.time() - t0
    if val["target_agreement"] < 0.9:
        log.warning("the target's argmax over the extracted features matches its greedy tokens only %.1f%% of the "
                    "time: the features may not be the ones the engine serves", 100 * val["target_agreement"])
    seconds = time.time() - t_start
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "tree")}
    meta = {
        "target_model": loaded.name,
        "target_path": loaded.path,
        "train": {**settings, "train_tokens": n_train_tok, "draft_vocab_coverage": coverage,
                  "seconds": round(seconds, 1),
                  **{k: round(v, 1) for k, v in timings.items()}},
        "metrics": {**train_stats, **{f"val_{k}": v for k, v in val.items()}},
    }
    save_head(a.out, head, meta)
    print(f"EAGLE head for {loaded.name} -> {a.out}")
    print(f"  validation (greedy, {int(val['positions'])} positions): top-1 {val['top1']:.3f}, "
          f"target agreement {val['target_agreement']:.3f}")
    if coverage is not None:
        print(f"  draft vocabulary: {a.draft_vocab} tokens, {100 * coverage:.2f}% of the generated training tokens")
    steps = int(val["serving_steps"])
    for prefix, label in (("", "per position"), ("serving_", f"per serving step, {steps} chain steps")):
        line = f"chain k={a.eval_k} {val[f'{prefix}accept_length_k{a.eval_k}']:.2f}"
        if a.tree:
            tree = val[f"{prefix}accept_length_tree{a.tree[0]}x{a.tree[1]}_k{a.eval_k}"]
            line += f", tree {a.eval_tree} depth {a.eval_k} {tree:.2f}"
        print(f"  simulated accept length ({label}): {line} tokens/step")
    print(f"  {len(train_set)} sequences, {n_train_tok} generated training tokens, {seconds:.0f} s "
          f"({', '.join(f'{k[:-2]} {v:.0f} s' for k, v in timings.items())})")
    flags = f"--num-draft-tokens {a.eval_k}" + (f" --speculative-tree {a.eval_tree}" if a.tree else "")
    print(f"  serve with: --speculative eagle --draft-model {a.out} {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
