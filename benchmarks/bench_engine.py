"""Engine vs Hugging Face `generate` in the same process: output tokens/s and decode step
time per batch size, plus the weight-bytes / memory-bandwidth floor on CUDA.

    python benchmarks/bench_engine.py                                  # SmolLM2, CPU or GPU
    python benchmarks/bench_engine.py --preset llama3-8b --batch-sizes 1,64   # dummy 8B shape

Prints a table and writes JSON (--out)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.engine.weights import reference_hf_model, resolve_dtype  # noqa: E402

PRESETS = {
    # Llama-3-8B's shape (weights are random: --load-format dummy).
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    ),
    # SmolLM2-135M's shape.
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts_for(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, input_len), generator=g).tolist()


def bench_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    core = engine.core
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    # Warm-up with a short and a full-length prompt: a backend's prefill kernels JIT-build or
    # autotune on first use (flashinfer's sm90 prefill: ~75 s), which must not be timed.
    engine.generate([prompts[0][:8], prompts[-1]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    core.cache.reset()
    reqs = [core.add_request(f"b{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)]
    sync(core.device)
    t0 = time.perf_counter()
    step_times, first_done = [], None
    while any(not r.finished for r in reqs):
        ts = time.perf_counter()
        core.step()
        sync(core.device)
        te = time.perf_counter()
        if all(r.output_ids for r in reqs):
            if first_done is None:
                first_done = te
            else:
                step_times.append(te - ts)
    total = time.perf_counter() - t0
    out_tokens = sum(len(r.output_ids) for r in reqs)
    step_times.sort()
    return dict(
        tok_s=out_tokens / total,
        total_s=total,
        prefill_s=(first_done or t0) - t0,
        step_ms_median=1000 * step_times[len(step_times) // 2] if step_times else float("nan"),
    )


def bench_hf(hf: torch.nn.Module, prompts: list[list[int]], output_len: int, device: torch.device) -> dict:
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, **kw)
        sync(device)
        total = time.perf_counter() - t0
    new = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return dict(tok_s=new / total, total_s=total, step_ms=1000 * total / output_len)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight, dense parameters and quantized layers' buffers alike."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-memory bandwidth (bytes read + written per second)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="dummy weights of a known shape")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--attention-backend", default="auto",
                    help="one backend, or several comma-separated: each runs in this process against the same "
                         "transformers baseline")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="the scheduler's prefill chunk (tokens per step)")
    ap.add_argument("--quantization", default="auto", help="auto | none | fp8 | int8 | int4 (quantized at load)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8_e4m3")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--hf-dtype", default=None, help="the transformers baseline's dtype (default: the engine's); "
                    "float32 is transformers' own default")
    ap.add_argument("--out", default="bench_engine.json")
    a = ap.parse_args()

    model, load_format = a.model, "auto"
    if a.preset:
        folder = tempfile.mkdtemp(prefix=f"runtime-{a.preset}-")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(PRESETS[a.preset], f)
        model, load_format = folder, "dummy"
    backends = a.attention_backend.split(",")
    opts = dict(device=a.device, dtype=a.dtype, load_format=load_format, kv_cache_tokens=a.kv_cache_tokens,
                quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype)
    if a.max_batch_tokens:
        opts["max_batch_tokens"] = a.max_batch_tokens
    engine = Engine(model, attention_backend=backends[0], **opts)
    device = engine.core.device
    dtype = resolve_dtype(a.dtype, device)
    hf_dtype = resolve_dtype(a.hf_dtype, device) if a.hf_dtype else dtype
    cfg = engine.core.model_config
    weight_bytes = model_bytes(engine.core.loaded.model)
    hf = None
    if not a.no_hf:
        if a.preset:  # the same random weights, so both compute the same function
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=hf_dtype)
            hf.load_state_dict(engine.core.loaded.model.hf_state_dict(), strict=False)
        else:
            hf = reference_hf_model(engine.core.loaded.path, hf_dtype).to(device)
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    hf_rows = {bs: bench_hf(hf, prompts_for(bs, a.input_len, cfg.vocab_size, seed=bs), a.output_len, device)
               for bs in batch_sizes} if hf is not None else {}
    rows, attention = [], []
    for i, backend in enumerate(backends):
        if i:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache() if device.type == "cuda" else None
            engine = Engine(model, attention_backend=backend, **opts)
        attention.append(engine.core.attn.name)
        for bs in batch_sizes:
            e = bench_engine(engine, prompts_for(bs, a.input_len, cfg.vocab_size, seed=bs), a.output_len)
            h = hf_rows.get(bs)
            row = dict(attention=engine.core.attn.name, batch=bs, engine=e, hf=h,
                       speedup=e["tok_s"] / h["tok_s"] if h else None)
            if bw:
                # Reading every weight once per step at the measured copy bandwidth (bytes read +
                # written per second: a pure read stream moves about as many bytes per second).
                row["floor_step_ms"] = 1000 * weight_bytes / bw
                row["step_over_floor"] = e["step_ms_median"] / row["floor_step_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(
        model=engine.core.loaded.name, preset=a.preset, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype), hf_dtype=str(hf_dtype), quantization=engine.core.loaded.model.quantization, attention=attention,
        input_len=a.input_len, output_len=a.output_len, max_batch_tokens=engine.core.cfg.max_batch_tokens,
        weight_bytes=weight_bytes, copy_bandwidth_Bps=bw, rows=rows,
    )
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['model']} on {result['device_name']} ({result['dtype']}), "
          f"input {a.input_len}, output {a.output_len}, max_batch_tokens {result['max_batch_tokens']}")
    print(f"{'attention':>10} {'batch':>5} {'engine tok/s':>13} {'HF tok/s':>10} {'speedup':>8} {'prefill s':>9} "
          f"{'step ms':>8} {'floor ms':>9}")
    for r in rows:
        hf_s = f"{r['hf']['tok_s']:10.1f}" if r["hf"] else f"{'-':>10}"
        sp = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8}"
        fl = f"{r['floor_step_ms']:9.2f}" if "floor_step_ms" in r else f"{'-':>9}"
        print(f"{r['attention']:>10} {r['batch']:>5} {r['engine']['tok_s']:13.1f} {hf_s} {sp} "
              f"{r['engine']['prefill_s']:9.3f} {r['engine']['step_ms_median']:8.2f} {fl}")
    engine.shutdown()


if __name__ == "__main__":
    main()
