#!/usr/bin/env bash
# One GPU call, most needed first (the step order below): the GPU tests (the FP8 gemv
# against its reference, the engine with CUDA graphs against transformers; GPU_TESTS picks
# the files); issue 14's bf16 gemv table (bench_gemv.py --sweep --tuned-out) and the 8B
# decode step without and with it; the standing check (`runtime up` on the Llama-3-8B shape
# in bf16 at concurrency 64, with that table); issue 18's plain-step cost of a speculative
# engine (bench_spec_off.py, dummy weights); then issue 17's FP8 decode: the FP8 gemv configs
# on the 8B shapes (bench_gemv_fp8.py, which writes the table kernels/gemv.py reads), the
# engine with that table (bench_quant --micro: bf16 vs FP8, decode b1/b64, prefill) and
# `runtime up` with FP8 weights at concurrency 64. Needs .carry (benchmarks/make_carry.sh;
# the GGUF part is not needed). Copy $OUT/gemv_{fp8,bf16}_tuned.json to
# runtime/kernels/configs/gemv_{fp8,bf16}_<GPU name, spaces as _>.<smXY>.json to keep them.
set -uo pipefail
STEPS=${STEPS:-gpu_tests bf16_sweep bf16_micro serve_bf16 serve_overlap spec_off sweep quant_micro fuse serve_fp8}
. benchmarks/gpu_lib.sh
python -m pip install -q --no-deps --no-index .carry/wheels/*.whl 2>&1 | grep -v -i "warning\|notice" | tail -3
[ -d .carry/gguf ] && cp .carry/gguf/* /tmp/  # for a gpu_spec.sh call right after
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The FP8 gemv against its reference, and the engine on CUDA (graphs included) against transformers.
gpu_tests() {
    TAIL=3 step gpu_tests "${GPU_TESTS_SECONDS:-150}" python -m pytest -q -p no:cacheprovider \
        ${GPU_TESTS:-tests/gpu/test_gemv_gpu.py tests/gpu/test_engine_gpu.py} -k "${GPU_TESTS_K:-fp8 or not gemv}"
}
[ "${GPU_TESTS_LAST:-0}" = 1 ] || gpu_tests  # GPU_TESTS_LAST=1: after the standing check instead
# Issue 14's batch-1 step in bf16: the gemv configs against cuBLAS on the 8B shapes (the
# lm_head included), written as the table model.linear reads; then the engine's decode step
# without and with that table, and the standing check below runs with it.
TAIL=2 step bf16_sweep 200 python benchmarks/bench_gemv.py --sweep --rows "${BF16_ROWS:-1,16}" --out "$OUT/gemv_bf16.json" \
    --shapes "${BF16_SHAPES:-qkv,o_proj,lm_head_49k,gate_up,down}" \
    --tuned-out "$OUT/gemv_bf16_tuned.json"
[ -f "$OUT/bf16_sweep.log" ] && grep -E "^(qkv|o_proj|gate_up|down|lm_head)|step at|  best" "$OUT/bf16_sweep.log"
if [ -f "$OUT/gemv_bf16_tuned.json" ]; then
    TAIL=4 RUNTIME_GEMV_BF16_CONFIGS=/nonexistent step bf16_micro 60 python benchmarks/bench_quant.py --micro \
        --device cuda --schemes none --out "$OUT/bf16_micro_off.json"
    export RUNTIME_GEMV_BF16_CONFIGS=$OUT/gemv_bf16_tuned.json
    TAIL=4 step bf16_micro 60 python benchmarks/bench_quant.py --micro --device cuda --schemes none \
        --out "$OUT/bf16_micro_tuned.json"
fi
# The standing check: bf16 at concurrency 64.
step serve_bf16 120 python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random --waves 2 \
    --input-len 1024 --output-len 256 --concurrency 64 \
    --extra "--model .carry/l8b --load-format dummy --attention-backend triton" --out "$OUT/serve_bf16.json"
# The overlap schedule (--overlap-schedule: each decode step launched before the host reads
# the last one): the standing check at 64 and issue 14's concurrency 256, with and without it.
for conc in ${OVERLAP_CONC:-64 256}; do
    for ov in "--no-overlap-schedule" "--overlap-schedule"; do
        TAIL=3 step serve_overlap 150 python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random \
            --waves 2 --input-len 1024 --output-len 256 --concurrency "$conc" \
            --extra "--model .carry/l8b --load-format dummy --attention-backend triton $ov" \
            --out "$OUT/serve_overlap_${conc}${ov:+_on}.json"
    done
done
[ "${GPU_TESTS_LAST:-0}" = 1 ] && gpu_tests
# Who spends the host's CPU while concurrency PROBE_CONC (default 256) is served: each process's
# CPU share every 2 s (the gateway, the decode worker, the benchmark's client), to tell an ITL
# the server gives from one its client's event loop records late.
if [[ " $STEPS " == *" serve_probe "* ]]; then
    (while sleep 2; do echo "-- $(date +%s)"; ps -eo pcpu,args --sort=-pcpu | head -6 | cut -c1-150; done) \
        > "$OUT/ps.log" 2>&1 &
    probe=$!
    TAIL=12 step serve_probe 120 python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random \
        --waves 2 --input-len 1024 --output-len 256 --concurrency "${PROBE_CONC:-256}" \
        --extra "--model .carry/l8b --load-format dummy --attention-backend triton" --out "$OUT/serve_probe.json"
    kill $probe
    grep -v "^--" "$OUT/ps.log" | grep -v "%CPU" | awk '{c=$1; $1=""; k=substr($0,1,70); s[k]+=c; n[k]++} \
        END {for (k in s) if (s[k]/n[k] > 5) printf "%6.1f%% mean %s\n", s[k]/n[k], k}' | sort -rn | head -8
fi
# Issue 18: what a speculative engine pays on steps that do not draft, engines of each kind
# alive together and their repeats taken in turn (none#2: the spread between two engines of
# one kind), on chat's shape with SmolLM2's config and dummy weights.
TAIL=80 step spec_off 150 python benchmarks/bench_spec_off.py --model .carry/smol --load-format dummy --device cuda \
    --batch 16 --workload ragged --kinds none,none#2,ngram-off,ngram-adaptive,ngram-on --interleave --kv-cache-tokens 262144 \
    --rounds 1 --repeats 8 --max-tokens 256 --profile --out "$OUT/spec_off.json"
TAIL=12 step sweep 200 python benchmarks/bench_gemv_fp8.py --rows "${ROWS:-1,16,64}" --out "$OUT/gemv_fp8.json" \
    --tuned-out "$OUT/gemv_fp8_tuned.json"
[ -f "$OUT/gemv_fp8_tuned.json" ] && export RUNTIME_GEMV_FP8_CONFIGS=$OUT/gemv_fp8_tuned.json
TAIL=4 step quant_micro 60 python benchmarks/bench_quant.py --micro --device cuda --schemes none,fp8 --out "$OUT/quant_micro.json"
# Issue 14's batch-1 step with fewer launches: RMSNorm and SiLU-mul inside the decode gemvs
# (RUNTIME_GEMV_FUSE) and the paged-decode merge inside its split kernel (RUNTIME_DECODE_MERGE):
# the fused kernels against the unfused ones, then the engine's decode step without and
# with them, bf16 and FP8, engines in one process.
TAIL=3 step fuse 90 python -m pytest -q -p no:cacheprovider tests/gpu/test_gemv_gpu.py tests/gpu/test_attention_gpu.py \
    -k "fused or (paged_decode_kernel and 32-8)"
TAIL=8 step fuse 200 python benchmarks/bench_quant.py --micro --device cuda --schemes "${FUSE_SCHEMES:-none,none+fuse,none+fuse+merge,fp8,fp8+fuse+merge}" \
    --out "$OUT/fuse_micro.json"
step serve_fp8 60 python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random --waves 2 \
    --input-len 1024 --output-len 256 --concurrency 64 \
    --extra "--model .carry/l8b --load-format dummy --attention-backend triton --quantization fp8" --out "$OUT/serve_fp8.json"
echo "done in $(( $(date +%s) - T0 )) s"
