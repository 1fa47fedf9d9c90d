#!/usr/bin/env bash
# The one-GPU run behind RESULTS.md's "FP8 KV cache and FP8 weights on the 8B shape" section
# (2026-12-07, seventh session), in one call with a deadline: each step runs only if the time
# it is given is left, most important first.
#
# Needs: .carry/l8b = the Llama-3-8B shape's config.json (vocab 49152) beside SmolLM2's
# tokenizer files; .carry/smol = SmolLM2's config.json and tokenizer files (dummy weights);
# .carry/wheels = the wheels the GPU image lacks (pyzmq, fastapi, uvicorn, xgrammar, ...);
# benchmarks/make_carry.sh builds them. Then gpu_spec.sh, then gpu_eagle.sh, each in the next
# call at once (the machine stays warm 30 s and /tmp with it).
set -uo pipefail
STEPS=${STEPS:-gpu_tests serve_bf16 quant_micro serve_fp8 serve_fp8kv}  # which steps run
. benchmarks/gpu_lib.sh
# The first part of SmolLM2's GGUF, for gpu_spec.sh in the next call (a call carries 64 MiB).
[ -d .carry/gguf ] && cp .carry/gguf/* /tmp/
python -m pip install -q --no-deps --no-index .carry/wheels/*.whl 2>&1 | grep -v -i "warning\|notice" | tail -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
L8B=".carry/l8b --load-format dummy --attention-backend triton"
CLUSTER=(python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random
         --waves 2 --input-len 1024 --output-len 256)
# GPU correctness of the FP8 kernels (KV cache, weight-only GEMV, row quantization) and engine paths.
TAIL=4 step gpu_tests 60 python -m pytest -q -p no:cacheprovider tests/gpu/test_attention_gpu.py \
    tests/gpu/test_fused_kernels_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_gemv_gpu.py -k "fp8 or rope"
# First, the standing check (bf16, Triton): runtime up on the 8B shape under runtime bench at 64.
step serve_bf16 110 "${CLUSTER[@]}" --concurrency 64 --extra "--model $L8B" --out "$OUT/serve_bf16.json"
# Engine level: bf16 vs FP8 weights, decode batch 1 / 64 and prefill 8 x 4096 (issue 17's targets).
step quant_micro 100 python benchmarks/bench_quant.py --micro --device cuda --schemes none,fp8 --out "$OUT/quant_micro.json"
# FP8 weights and an FP8 KV cache: the issue-14 targets that bf16 cannot reach.
step serve_fp8 150 "${CLUSTER[@]}" --concurrency 64,256 \
    --extra "--model $L8B --quantization fp8 --kv-cache-dtype fp8_e4m3" --out "$OUT/serve_fp8.json"
# (Structured output runs with SmolLM2's real weights in gpu_spec.sh, the next call.)
# FP8 KV alone (bf16 weights): what the cache's half of the bytes gives at 256.
step serve_fp8kv 170 "${CLUSTER[@]}" --concurrency 64,256 --extra "--model $L8B --kv-cache-dtype fp8_e4m3" --out "$OUT/serve_fp8kv.json"
echo "done in $(( $(date +%s) - T0 )) s"
