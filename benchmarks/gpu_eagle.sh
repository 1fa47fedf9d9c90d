#!/usr/bin/env bash
# Issue 18's EAGLE rows on one GPU: train a head for SmolLM2 (`runtime train-draft`, as the
# fourth session's: about 350 s on an H200), then bench_spec with the EAGLE chain and the 6x32
# tree, fixed and adaptive, chat and copy, against no speculation in the same run.
#
# Needs /tmp/smol (the converted SmolLM2 folder gpu_spec.sh leaves) on the same warm machine:
# run it in the calls right after gpu_spec.sh (a machine stays warm 30 s after a call), e.g.
#   call 3: STEPS=train OUT=$OUT bash benchmarks/gpu_eagle.sh
#   call 4: STEPS="bench_b1 bench_b16" OUT=$OUT bash benchmarks/gpu_eagle.sh
set -uo pipefail
STEPS=${STEPS:-train bench_b1 bench_b16}
. benchmarks/gpu_lib.sh
[ -f /tmp/smol/config.json ] || { echo "no /tmp/smol: run gpu_spec.sh on this machine first"; exit 1; }
TAIL=8 step train 500 python -m runtime.cli train-draft --model /tmp/smol --out /tmp/eagle \
    --num-prompts "${EAGLE_PROMPTS:-20480}" --max-new-tokens 256 --epochs 3 --batch-size 32 --lr 1.5e-3 --train-depth 3
[ -f /tmp/eagle/eagle_config.json ] || { echo "no head in /tmp/eagle"; exit 1; }
EAGLE=(python benchmarks/bench_spec.py --model /tmp/smol --eagle /tmp/eagle --methods none,eagle --eagle-trees chain,6x32
       --eagle-draft-tokens 6 --policies fixed,adaptive --workloads chat,copy --max-tokens 256 --trace-policy)
TAIL=12 step bench_b1 260 "${EAGLE[@]}" --batch-sizes 1 --out "$OUT/eagle_b1.json"
TAIL=12 step bench_b16 260 "${EAGLE[@]}" --batch-sizes 16 --out "$OUT/eagle_b16.json"
echo "done in $(( $(date +%s) - T0 )) s"
