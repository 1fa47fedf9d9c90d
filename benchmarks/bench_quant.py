"""Quantization schemes against the unquantized model, all in one run.

Accuracy mode (default; SmolLM2 real weights, CPU or CUDA): for each scheme, greedy token
agreement with the baseline over 32 prompts x 64 tokens (free-running, and teacher-forced:
each token judged with the baseline's prefix), the mean KL(baseline || scheme) of the
next-token distributions over a fixed text, the perplexity of that text, and tokens/s of
the 32-prompt batch.

    python benchmarks/bench_quant.py                           # CPU: none(bf16/fp32 auto), int8, int4, fp8 (reference)
    python benchmarks/bench_quant.py --device cuda --schemes none,fp8

Micro mode (GPU): the Llama-3-8B shape with dummy weights quantized at load, bf16 against
fp8 in the same run: decode step at batch 1 and 64, prefill of 8 x 4096 tokens.

    python benchmarks/bench_quant.py --micro --device cuda
    python benchmarks/bench_quant.py --micro --device cuda --schemes none,none+fuse+merge,fp8,fp8+fuse+merge

Prints a table and writes JSON (--out)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import PRESETS, bench_engine, model_bytes, prompts_for  # noqa: E402

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.engine import kernel_dispatch  # noqa: E402
from runtime.engine.quant.evaluate import (  # noqa: E402
    forced_agreement, mean_kl, perplexity, positional_agreement, sequence_logits,
)

# A fixed text for KL and perplexity: plain English prose the model has not been asked to write.
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Before his "
    "invention, books were copied by hand, which made them rare and expensive. Within fifty years, presses "
    "had spread to more than two hundred cities across Europe, and millions of books had been printed. The "
    "new technology changed how people learned, argued and worshipped: ideas could travel faster than ever, "
    "scientists could share exact copies of their results, and ordinary readers could own a Bible, a "
    "grammar or an almanac. Historians still debate how much the press caused the Reformation and the "
    "scientific revolution, but few doubt that it made both possible on the scale they reached."
)
TOPICS = ["the ocean", "a city at night", "learning to cook", "the moon", "a train journey", "winter",
          "an old library", "a software bug", "the first day of school", "a mountain village", "bees",
          "a thunderstorm", "chess", "a lost key", "the desert", "a bicycle"]
PROMPTS = [f"Write a short story about {t}." for t in TOPICS] + [f"Explain {t} to a child." for t in TOPICS]


def accuracy(a: argparse.Namespace) -> dict:
    rows = []
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    base = base_ids = base_logits = text_ids = None
    for scheme in a.schemes.split(","):
        eng = Engine(a.model, device=a.device, dtype=a.dtype, quantization=scheme)
        model = eng.core.loaded.model
        if base is None:
            prompts = [eng.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[: a.num_prompts]]
            text_ids = eng._encode(TEXT)
        eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        out = [r.token_ids for r in eng.generate(prompts, params)]
        tok_s = sum(map(len, out)) / (time.perf_counter() - t0)
        logits = sequence_logits(model, text_ids)
        row = dict(scheme=model.quantization, dtype=str(eng.core.loaded.dtype).removeprefix("torch."),
                   weight_MB=model_bytes(model) / 2**20, tok_s=tok_s, ppl=perplexity(logits, text_ids))
        if base is None:
            base, base_ids, base_logits = out, prompts, logits
            row.update(agree=1.0, forced=1.0, kl=0.0)
        else:
            row.update(agree=positional_agreement(base, out), kl=mean_kl(base_logits, logits),
                       forced=sum(forced_agreement(model, p, b) for p, b in zip(base_ids, base)) / len(base))
        rows.append(row)
        print(json.dumps(row), flush=True)
        eng.shutdown()
        del eng, model
        gc.collect()
    return dict(mode="accuracy", model=a.model or "SmolLM2-135M-Instruct", device=a.device, rows=rows)


def micro(a: argparse.Namespace) -> dict:
    from runtime.kernels import paged_decode as paged_decode_mod  # Triton: the GPU mode only

    folder = tempfile.mkdtemp(prefix="runtime-llama3-8b-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(PRESETS["llama3-8b"], f)
    rows = []
    for label in a.schemes.split(","):
        # "<scheme>[+fuse][+merge]": +fuse runs RMSNorm and SiLU-mul inside the decode gemvs
        # (RUNTIME_GEMV_FUSE=on), +merge merges the paged-decode splits in the kernel
        # (RUNTIME_DECODE_MERGE=fused); both are read when the engine captures its graphs.
        scheme, *opts = label.split("+")
        if set(opts) - {"fuse", "merge"}:
            raise SystemExit(f"unknown option in {label!r}: use +fuse and/or +merge")
        kernel_dispatch._FUSE = "fuse" in opts
        paged_decode_mod._MERGE = "fused" if "merge" in opts else "launch"
        eng = Engine(folder, device=a.device, dtype="bfloat16", load_format="dummy", quantization=scheme,
                     kv_cache_tokens=a.kv_cache_tokens, max_batch_tokens=4096, max_running=64)
        vocab = eng.core.model_config.vocab_size
        row = dict(scheme="+".join([eng.core.loaded.model.quantization, *opts]),
                   weight_GB=model_bytes(eng.core.loaded.model) / 1e9)
        for bs in (1, 64):
            r = bench_engine(eng, prompts_for(bs, a.input_len, vocab, seed=bs), a.output_len)
            row[f"decode_b{bs}_ms"] = r["step_ms_median"]
        r = bench_engine(eng, prompts_for(8, 4096, vocab, seed=8), 1)
        row["prefill_8x4096_tok_s"] = 8 * 4096 / r["prefill_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        eng.shutdown()
        del eng
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    base = rows[0]
    for r in rows[1:]:
        r["decode_b1_ratio"] = r["decode_b1_ms"] / base["decode_b1_ms"]
        r["decode_b64_ratio"] = r["decode_b64_ms"] / base["decode_b64_ms"]
        r["prefill_speedup"] = r["prefill_8x4096_tok_s"] / base["prefill_8x4096_tok_s"]
    return dict(mode="micro", preset="llama3-8b", device=a.device,
                device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="the baseline's and the schemes' activation dtype")
    ap.add_argument("--schemes", default=None, help="comma list; the first is the baseline (default: "
                    "none,int8,int4,fp8 on CPU; none,fp8 on CUDA)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--micro", action="store_true", help="GPU: the 8B shape, dummy weights, decode/prefill times")
    ap.add_argument("--input-len", type=int, default=512, help="--micro: decode prompts' length")
    ap.add_argument("--kv-cache-tokens", type=int, default=65536, help="--micro: KV pool size")
    ap.add_argument("--out", default="bench_quant.json")
    a = ap.parse_args()
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.schemes = a.schemes or ("none,fp8" if cuda else "none,int8,int4,fp8")
    if a.micro:
        a.output_len = a.output_len if a.output_len != 64 else 32
        result = micro(a)
        print(f"\n{'scheme':>15} {'GB':>6} {'b1 ms':>7} {'b64 ms':>7} {'prefill tok/s':>14}")
        for r in result["rows"]:
            print(f"{r['scheme']:>15} {r['weight_GB']:6.2f} {r['decode_b1_ms']:7.2f} {r['decode_b64_ms']:7.2f} "
                  f"{r['prefill_8x4096_tok_s']:14.0f}" + (f"   ratios b1 {r['decode_b1_ratio']:.2f} b64 "
                  f"{r['decode_b64_ratio']:.2f} prefill {r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else ""))
    else:
        result = accuracy(a)
        print(f"\n{result['model']} on {a.device}, {a.num_prompts} prompts x {a.output_len} tokens")
        print(f"{'scheme':>6} {'dtype':>9} {'MB':>7} {'agree':>6} {'forced':>7} {'KL':>8} {'ppl':>7} {'tok/s':>7}")
        for r in result["rows"]:
            print(f"{r['scheme']:>6} {r['dtype']:>9} {r['weight_MB']:7.1f} {r['agree']:6.3f} {r['forced']:7.3f} "
                  f"{r['kl']:8.4f} {r['ppl']:7.2f} {r['tok_s']:7.1f}")
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
