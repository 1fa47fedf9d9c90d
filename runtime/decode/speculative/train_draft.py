"""`runtime train-draft`: train an EAGLE head (see eagle.py) for a target model by
self-distillation, with no labelled data.

1. Varied prompts: instruction templates x subjects x styles (chat-templated when the
   tokenizer has a chat template).
2. Continuations from the target itself with `runtime.Engine`: temperature sampling for
   training; the held-out prompts (5%) are decoded greedily, so that the chain simulation
   in (5) is exact for greedy serving.
3. Features: one plain forward of transformers' model over each whole sequence;
   `last_hidden_state` is the final RMSNorm's output, the same tensor our engine hands to
   the drafter (tests/unit/test_eagle.py checks the two agree).
4. Training, teacher-forced over the generated part only (the head's serving context
   starts at the first generated token, see eagle.py): pair t = (x_p, f_{p-1}) for
   p = L + t predicts f_p. Loss = feature_weight * SmoothL1(f^_p, f_p)
   + token_weight * CE(lm_head(f^_p), softmax(lm_head(f_p))). The token term uses the
   target's own distribution (EAGLE's choice): its expectation equals the CE against
   tokens sampled from the target, with less variance. AdamW, warmup + cosine.
5. Validation on the greedy held-out sequences: top-1 (head's argmax == the target's next
   token) and the chain accept length for k drafts: from every position the head drafts k
   tokens autoregressively (real features up to the position, its own predicted features
   after, exactly as EagleDrafter does), and a step gains 1 + the number of leading drafts
   that match. This is the per-position mean; the engine's per-step mean weights positions
   by where steps begin, so it differs slightly.
"""
from __future__ import annotations

import argparse
import gc
import itertools
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

from runtime.decode.speculative.eagle import EagleHead, save_head
from runtime.engine.model import LlamaForCausalLM
from runtime.engine.weights import LoadedModel

log = logging.getLogger("runtime.train_draft")

TEMPLATES = [
    "Explain {s} in simple terms.",
    "Write a short story about {s}.",
    "What are the main advantages and disadvantages of {s}?",
    "Give me five interesting facts about {s}.",
    "Write a poem about {s}.",
    "How would you teach {s} to a ten-year-old?",
    "Summarize the history of {s}.",
    "Write a Python function that has something to do with {s}, and explain it.",
    "What are common misconceptions about {s}?",
    "Compare {s} with something similar and describe the differences.",
    "Write an email to a friend about {s}.",
    "List the steps to get started with {s}.",
    "Why is {s} important?",
    "Describe a typical day of someone who works with {s}.",
    "Write a dialogue between two people discussing {s}.",
    "What questions should a beginner ask about {s}?",
    "Write a product description inspired by {s}.",
    "Give a step-by-step plan to learn about {s} in one month.",
    "What will {s} look like in twenty years?",
    "Write a news headline and a short article about {s}.",
    "Answer briefly: what is {s}?",
    "Create a quiz with three questions about {s}, with answers.",
    "Describe {s} using an analogy.",
    "Write a haiku about {s}, then explain it.",
]
SUBJECTS = [
    "the ocean", "black holes", "photosynthesis", "the French Revolution", "machine learning", "coffee",
    "volcanoes", "the human heart", "climate change", "chess", "the Roman Empire", "electric cars",
    "honey bees", "quantum computing", "the internet", "gardening", "the moon landing", "recycling",
    "jazz music", "sleep", "the stock market", "dinosaurs", "vaccines", "renewable energy",
    "ancient Egypt", "cooking pasta", "friendship", "mountains", "the printing press", "smartphones",
    "rainforests", "the water cycle", "prime numbers", "the solar system", "public libraries",
    "running a marathon", "cats", "bridges", "democracy", "earthquakes", "learning a new language",
    "baking bread", "the immune system", "robots", "time management", "the Great Wall of China",
    "sorting algorithms", "volunteering",
]
STYLES = ["", " Keep it short.", " Be detailed and give examples.", " Use a friendly, casual tone."]


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompt texts, a seeded shuffle of templates x subjects x styles (cycled past 4608)."""
    combos = [t.format(s=s) + st for t, s, st in itertools.product(TEMPLATES, SUBJECTS, STYLES)]
    random.Random(seed).shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


def prompt_ids(engine, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, chat-templated when the tokenizer has a template."""
    if getattr(engine.tokenizer, "chat_template", None):
        return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [list(engine.tokenizer(t)["input_ids"]) for t in texts]


@dataclass
class Sample:
    """One generated sequence: prompt of L tokens, continuation x_L .. x_{n-1} (T tokens)."""

    tokens: torch.Tensor  # int64 [T] CPU: x_L .. x_{n-1}, the head's pair tokens
    feats: torch.Tensor  # [T+1, H] device: f_{L-1} .. f_{n-1}
    start: int  # L: the position of tokens[0]


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, T]
    feat_in: torch.Tensor  # [B, T, H]: f_{p-1}, the pair's feature
    feat_out: torch.Tensor  # [B, T, H]: f_p, what the head predicts
    positions: torch.Tensor  # int64 [B, T]
    lens: torch.Tensor  # int64 [B] valid pairs per row
    mask: torch.Tensor  # bool [B, T]


def collate(samples: list[Sample], device: torch.device) -> Batch:
    b, t = len(samples), max(len(s.tokens) for s in samples)
    h = samples[0].feats.shape[1]
    tokens = torch.zeros(b, t, dtype=torch.int64)
    feats = torch.zeros(b, t + 1, h, dtype=torch.float32, device=device)
    lens = torch.tensor([len(s.tokens) for s in samples])
    for i, s in enumerate(samples):
        tokens[i, : len(s.tokens)] = s.tokens
        feats[i, : len(s.feats)] = s.feats.float()
    starts = torch.tensor([s.start for s in samples])
    positions = starts[:, None] + torch.arange(t)[None, :]
    mask = torch.arange(t)[None, :] < lens[:, None]
    return Batch(tokens.to(device), feats[:, :-1], feats[:, 1:], positions.to(device), lens.to(device), mask.to(device))


def batches(samples: list[Sample], size: int, device: torch.device, rng: random.Random | None) -> Iterator[Batch]:
    order = list(range(len(samples)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        yield collate([samples[j] for j in order[i : i + size]], device)


# ---- data ------------------------------------------------------------------------------------
def generate(core, prompts: list[list[int]], params: list, desc: str) -> list[list[int]]:
    """Continuations of every prompt, all scheduled together (continuous batching)."""
    reqs = [core.add_request(f"train-draft-{desc}-{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts, params))]
    done = 0
    with tqdm(total=len(reqs), desc=f"generate ({desc})", unit="seq") as bar:
        while core.has_work:
            core.step()
            now = sum(r.finished for r in reqs)
            if now > done:
                bar.update(now - done)
                done = now
    return [list(r.output_ids) for r in reqs]


@torch.no_grad()
def extract_features(hf_model: torch.nn.Module, seqs: list[tuple[list[int], list[int]]], batch_size: int,
                     device: torch.device, desc: str) -> list[Sample]:
    """The target's final hidden states of each (prompt, output) with one forward per batch
    of sequences (right-padded; causal attention keeps padding out of real rows)."""
    out: list[Sample | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for i in tqdm(range(0, len(order), batch_size), desc=f"features ({desc})", unit="batch"):
        idx = [j for j in order[i : i + batch_size] if seqs[j][1]]
        if not idx:
            continue
        full = [seqs[j][0] + seqs[j][1] for j in idx]
        n = max(map(len, full))
        ids = torch.zeros(len(full), n, dtype=torch.int64)
        mask = torch.zeros(len(full), n, dtype=torch.int64)
        for r, f in enumerate(full):
            ids[r, : len(f)] = torch.tensor(f)
            mask[r, : len(f)] = 1
        hidden = hf_model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, j in enumerate(idx):
            prompt, output = seqs[j]
            start = len(prompt)
            out[j] = Sample(torch.tensor(output), hidden[r, start - 1 : start + len(output)].clone(), start)
    return [s for s in out if s is not None]


# ---- training and validation -----------------------------------------------------------------
def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)


def train_loss(head: EagleHead, target: LlamaForCausalLM, b: Batch, feature_weight: float,
               token_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    emb = target.model.embed_tokens(b.tokens)
    pred = head.forward_dense(emb, b.feat_in, b.positions)[b.mask]  # [M, H]
    tgt = b.feat_out[b.mask]
    w = target.lm_head.weight
    floss = F.smooth_l1_loss(pred.float(), tgt)
    logits = F.linear(pred, w).float()
    with torch.no_grad():
        tprob = F.linear(tgt.to(pred.dtype), w).float().softmax(-1)
    tloss = -(tprob * logits.log_softmax(-1)).sum(-1).mean()
    acc = (logits.argmax(-1) == tprob.argmax(-1)).float().mean()
    loss = feature_weight * floss + token_weight * tloss
    return loss, {"loss": loss.item(), "feat": floss.item(), "tok": tloss.item(), "top1": acc.item()}


@torch.no_grad()
def chain_drafts(head: EagleHead, target: LlamaForCausalLM, b: Batch, k: int) -> torch.Tensor:
    """Drafts [B, T, k]: row t holds the k tokens the head drafts after pair t, with real
    pairs 0..t as context and its own predicted pairs after, as EagleDrafter does."""
    w = target.lm_head.weight
    embed = target.model.embed_tokens
    x = head.project(embed(b.tokens), b.feat_in)
    q, k_real, v_real = head.qkv(x, b.positions)  # [B, Hq|Hkv, T, D]
    scale = head.layer.self_attn.scale
    rep = q.shape[1] // k_real.shape[1]
    feat = head.finish(x, F.scaled_dot_product_attention(q, k_real, v_real, is_causal=True, scale=scale,
                                                        enable_gqa=rep != 1))
    draft = F.linear(feat, w).argmax(-1)
    drafts = [draft]
    k_real, v_real = k_real.repeat_interleave(rep, 1), v_real.repeat_interleave(rep, 1)
    t = b.tokens.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    k_chain: list[torch.Tensor] = []
    v_chain: list[torch.Tensor] = []
    for j in range(1, k):
        # Draft pair j of chain t sits at position p + j and sees real pairs <= t and the
        # chain's own draft pairs 1..j (itself included).
        x = head.project(embed(draft), feat)
        q, kj, vj = head.qkv(x, b.positions + j)
        k_chain.append(kj.repeat_interleave(rep, 1))
        v_chain.append(vj.repeat_interleave(rep, 1))
        s_real = (q @ k_real.transpose(-1, -2)).float().masked_fill(~causal, float("-inf"))  # [B, Hq, T, T]
        s_chain = torch.stack([(q * kc).sum(-1) for kc in k_chain], -1).float()  # [B, Hq, T, j]
        p = (torch.cat((s_real, s_chain), -1) * scale).softmax(-1)
        out = p[..., :t].to(v_real.dtype) @ v_real
        for i, vc in enumerate(v_chain):
            out = out + p[..., t + i, None].to(vc.dtype) * vc
        feat = head.finish(x, out.to(x.dtype))
        draft = F.linear(feat, w).argmax(-1)
        drafts.append(draft)
    return torch.stack(drafts, -1)


@torch.no_grad()
def evaluate(head: EagleHead, target: LlamaForCausalLM, samples: list[Sample], batch_size: int, k: int,
             device: torch.device) -> dict[str, float]:
    """Top-1, chain accept length for k drafts, and how often the target's argmax over the
    extracted features agrees with the generated (greedy) token: near 1 when the features
    are the ones the engine sees."""
    was_training = head.training
    head.eval()
    top1 = agree = n1 = 0.0
    accept = nk = 0.0
    for b in batches(samples, batch_size, device, None):
        with _autocast(device, target.lm_head.weight.dtype):
            d = chain_drafts(head, target, b, k)  # [B, T, k]
            tgt_argmax = F.linear(b.feat_out.to(target.lm_head.weight.dtype), target.lm_head.weight).argmax(-1)
        t = b.tokens.shape[1]
        pos = torch.arange(t, device=device)[None, :]
        nxt = torch.full_like(b.tokens, -1)
        nxt[:, :-1] = b.tokens[:, 1:]
        has_next = pos < (b.lens[:, None] - 1)
        top1 += (d[..., 0] == nxt)[has_next].sum().item()
        agree += (tgt_argmax == nxt)[has_next].sum().item()
        n1 += has_next.sum().item()
        want = torch.full_like(d, -1)  # want[:, t, j-1] = x at pair t + j
        for j in range(1, k + 1):
            want[:, : t - j, j - 1] = b.tokens[:, j:]
        full = pos + k < b.lens[:, None]  # all k next tokens exist
        lead = (d == want).long().cumprod(-1).sum(-1)  # leading matches
        accept += (1 + lead)[full].sum().item()
        nk += full.sum().item()
    head.train(was_training)
    return {
        "top1": top1 / max(n1, 1), f"accept_length_k{k}": accept / max(nk, 1) if nk else float("nan"),
        "target_agreement": agree / max(n1, 1), "positions": n1,
    }


def train(head: EagleHead, target: LlamaForCausalLM, train_set: list[Sample],
          a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    steps_per_epoch = math.ceil(len(train_set) / a.batch_size)
    total = max(1, steps_per_epoch * a.epochs)
    warmup = max(1, total // 20)
    opt = torch.optim.AdamW(head.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(a.seed)
    head.train()
    stats: dict[str, float] = {}
    with tqdm(total=total, desc="train", unit="step") as bar:
        for epoch in range(a.epochs):
            for b in batches(train_set, a.batch_size, device, rng):
                with _autocast(device, target.lm_head.weight.dtype):
                    loss, stats = train_loss(head, target, b, a.feature_weight, a.token_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.3f}", top1=f"{stats['top1']:.3f}")
    return {f"train_{k}": v for k, v in stats.items()}


# ---- the command -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runtime train-draft",
                                description="Train an EAGLE draft head for `--speculative eagle` by self-distillation.")
    p.add_argument("--model", default=None, help="HF folder of the target (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder to write the head to (pass it as --draft-model)")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the training data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="prompts held out (decoded greedily)")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the SmoothL1 feature loss")
    p.add_argument("--token-weight", type=float, default=0.1, help="weight of the cross-entropy token loss")
    p.add_argument("--eval-k", type=int, default=4, help="draft length of the simulated accept length")
    a = p.parse_args(argv)
    if a.num_prompts < 2:
        p.error("--num-prompts must be at least 2 (one is held out for validation)")
    if a.max_new_tokens < 2 or a.epochs < 1 or a.batch_size < 1 or a.lr <= 0:
        p.error("--max-new-tokens >= 2, --epochs >= 1, --batch-size >= 1 and --lr > 0 are required")
    if not 0.0 < a.val_fraction < 1.0:
        p.error("--val-fraction must be in (0, 1)")
    return a


def build_data(a: argparse.Namespace) -> tuple[LoadedModel, list[Sample], list[Sample]]:
    """Generate with the engine, then extract features with transformers. Returns the
    target (for its embedding and lm_head), the training and the validation samples."""
    from runtime import Engine, SamplingParams
    from runtime.engine.weights import reference_hf_model

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    # The engine's KV pool must leave room for the transformers model and training.
    engine = Engine(a.model, device="cuda" if cuda else "cpu", dtype=a.dtype, seed=a.seed, kv_mem_fraction=0.4)
    loaded = engine.core.loaded
    if os.path.isfile(loaded.path):
        raise ValueError(f"{loaded.path} is not a Hugging Face folder: features come from transformers")
    ids = prompt_ids(engine, make_prompts(a.num_prompts, a.seed))
    n_val = max(1, round(a.num_prompts * a.val_fraction))
    room = engine.core.max_model_len - 1
    params = [
        SamplingParams(max_tokens=max(1, min(a.max_new_tokens, room - len(p))),
                       temperature=0.0 if i < n_val else a.temperature, seed=a.seed * 1_000_003 + i)
        for i, p in enumerate(ids)
    ]
    outputs = generate(engine.core, ids, params, f"{len(ids) - n_val} train + {n_val} greedy validation")
    engine.shutdown()
    del engine
    gc.collect()
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = reference_hf_model(loaded.path, loaded.dtype).to(device)
    seqs = list(zip(ids, outputs))
    val_set = extract_features(hf, seqs[:n_val], 2 * a.batch_size, device, "validation")
    train_set = extract_features(hf, seqs[n_val:], 2 * a.batch_size, device, "train")
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return loaded, train_set, val_set


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    t0 = time.time()
    torch.manual_seed(a.seed)
    try:
        loaded, train_set, val_set = build_data(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"runtime train-draft: error: {e}", file=sys.stderr)
        return 2
    target, device = loaded.model, loaded.device
    n_train_tok = sum(len(s.tokens) for s in train_set)
    log.info("data: %d training sequences (%d tokens), %d validation sequences (%d tokens)",
             len(train_set), n_train_tok, len(val_set), sum(len(s.tokens) for s in val_set))
    if not train_set:
        print("runtime train-draft: error: the model generated no tokens to train on", file=sys.stderr)
        return 2

    head = EagleHead.for_target(target)
    train_stats = train(head, target, train_set, a, device)
    val = evaluate(head, target, val_set, a.batch_size, a.eval_k, device)
    if val["target_agreement"] < 0.9:
        log.warning("the target's argmax over the extracted features matches its greedy tokens only %.1f%% of the "
                    "time: the features may not be the ones the engine serves", 100 * val["target_agreement"])
    seconds = time.time() - t0
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    meta = {
        "target_model": loaded.name,
        "target_path": loaded.path,
        "train": {**settings, "train_tokens": n_train_tok, "seconds": round(seconds, 1)},
        "metrics": {**train_stats, **{f"val_{k}": v for k, v in val.items()}},
    }
    save_head(a.out, head, meta)
    acc = val[f"accept_length_k{a.eval_k}"]
    print(f"EAGLE head for {loaded.name} -> {a.out}")
    print(f"  validation (greedy): top-1 {val['top1']:.3f}, accept length (k={a.eval_k}) {acc:.2f} tokens/step, "
          f"target agreement {val['target_agreement']:.3f} over {int(val['positions'])} positions")
    print(f"  {len(train_set)} sequences, {n_train_tok} training tokens, {seconds:.0f} s")
    print(f"  serve with: --speculative eagle --draft-model {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
