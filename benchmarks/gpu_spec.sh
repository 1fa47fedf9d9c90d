#!/usr/bin/env bash
# Issue 15's structured-output benchmark with SmolLM2's real weights, then issue 18 on one GPU: n-gram speculation, fixed and adaptive, against none in the same run,
# chat and copy at batch 16, 64 and 1, with the adaptive policy's step-by-step trace.
#
# SmolLM2's GGUF (98 MB) does not fit one call: the call before copies .carry/gguf/smolpart_aa
# to /tmp (gpu_fp8.sh does), this one carries .carry2/ (the rest) and must follow while the
# machine is warm. Wheels were installed by the call before.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
[ -d .carry2/wheels ] && python -m pip install -q --no-deps --no-index .carry2/wheels/*.whl 2>&1 | grep -v -i "warning\|notice" | tail -3
cat /tmp/smolpart_aa .carry2/smolpart_* > /tmp/smol.gguf || exit 1
python -c "from pathlib import Path; from runtime.engine.default_model import convert_gguf_to_hf; \
convert_gguf_to_hf(Path('/tmp/smol.gguf'), Path('/tmp/smol'))" 2>&1 | tail -2
# Issue 15: structured output with the real weights (JSON schema vs free at 1 and 16,
# jump-forward on vs off); RUN_STRUCT=0 skips it and the accuracy report.
if [ "${RUN_STRUCT:-1}" = 1 ]; then
timeout "${STRUCT_SECONDS:-90}" python benchmarks/bench_structured.py --model /tmp/smol --device cuda --batch-sizes 1,16 \
    --num-prompts 16 --max-tokens 128 --out "$OUT/structured.json" > "$OUT/structured.log" 2>&1
echo "rc=$?"; tail -12 "$OUT/structured.log"
# Issue 17: the accuracy report of FP8 weights on SmolLM2's real weights (bf16 baseline).
timeout "${QUANT_SECONDS:-90}" python benchmarks/bench_quant.py --model /tmp/smol --device cuda --schemes none,fp8 \
    --out "$OUT/quant_smol.json" > "$OUT/quant_smol.log" 2>&1
echo "rc=$?"; tail -5 "$OUT/quant_smol.log"
fi
[ "${RUN_SPEC:-1}" = 1 ] || exit 0  # RUN_SPEC=0: the structured and accuracy benchmarks alone
# Issue 18: what a speculative engine's plain steps cost against no speculation (engines alive
# together, repeats in turn), then the policies, each run paired with a no-speculation engine's
# run just before it (--paired: the speedups that issue 18 asks for; the row none is a
# second no-speculation engine, the spread between instances).
if [ "${RUN_OFF:-1}" = 1 ]; then  # RUN_OFF=0 skips it
timeout "${OFF_SECONDS:-150}" python benchmarks/bench_spec_off.py --model /tmp/smol --device cuda --batch 16 \
    --workload chat --kinds none,none#2,ngram-off,ngram-adaptive --interleave --kv-cache-tokens 262144 \
    --rounds 1 --repeats 6 --out "$OUT/spec_off.json" > "$OUT/spec_off.log" 2>&1
echo "rc=$?"; tail -5 "$OUT/spec_off.log"
fi
SPEC=(python benchmarks/bench_spec.py --model /tmp/smol --methods none,ngram --num-draft-tokens 4 --policies fixed,adaptive
      --workloads chat,copy --max-tokens 256 --trace-policy --paired --kv-cache-tokens 262144)
# Batch 16 and 64 first (where adaptive lost), then batch 1.
timeout "${SPEC_SECONDS:-240}" "${SPEC[@]}" --batch-sizes "${SPEC_BATCHES:-16,64}" --out "$OUT/bench_spec_b16.json" > "$OUT/bench_spec_b16.log" 2>&1
echo "rc=$?"; tail -14 "$OUT/bench_spec_b16.log"
[ "${RUN_SPEC1:-1}" = 1 ] || exit 0
timeout "${SPEC1_SECONDS:-240}" "${SPEC[@]}" --batch-sizes 1 --out "$OUT/bench_spec_b1.json" > "$OUT/bench_spec_b1.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/bench_spec_b1.log"
