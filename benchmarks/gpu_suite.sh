#!/usr/bin/env bash
# What is run on the one-GPU device machine for RESULTS.md (updated 2026-12-02, third session),
# in one script: GPU tests, per-step kernel traces, the engine vs transformers, an EAGLE
# head trained by train-draft, and the drafters under both speculation policies.
#
# Needs: SMOL_DIR = a converted SmolLM2 folder (python -c "from pathlib import Path; from
# runtime.engine.default_model import convert_gguf_to_hf; convert_gguf_to_hf(Path(GGUF),
# Path(SMOL_DIR))", with the gguf package importable); flashinfer optional.
# About 12 minutes on an H200; split it where one call is limited to less (train-draft alone
# takes about 5).
set -uo pipefail
OUT=${OUT:-/tmp/out}
SMOL_DIR=${SMOL_DIR:?set SMOL_DIR to a converted SmolLM2 folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
RUNTIME_TEST_SMOLLM2_DIR="$SMOL_DIR" python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
python benchmarks/bench_draft_kernels.py --out "$OUT/bench_draft_kernels.json" | tail -8
python benchmarks/trace_step.py --batch 1 --specs none,ngram,eagle:chain,eagle:4x16,eagle:8x48,eagle:chain@adaptive --out "$OUT/trace_b1.json" | grep "=="
python benchmarks/trace_step.py --batch 16 --specs none,eagle:chain --out "$OUT/trace_b16.json" | grep "=="
python benchmarks/bench_engine.py --model "$SMOL_DIR" --batch-sizes 1,64 --input-len 128 --output-len 128 --out "$OUT/bench_smollm2.json" | tail -3
python -m runtime.cli train-draft --model "$SMOL_DIR" --out /tmp/eagle --num-prompts 20480 --max-new-tokens 256 --epochs 3 \
    --batch-size 32 --lr 1.5e-3 --train-depth 3 2>&1 | tr '\r' '\n' | grep -v "/s\]$" | tail -8
python benchmarks/bench_spec.py --model "$SMOL_DIR" --eagle /tmp/eagle --methods none,ngram,eagle --eagle-trees chain,6x32,8x48 \
    --eagle-draft-tokens 6 --num-draft-tokens 4 --policies fixed,adaptive --workloads chat,copy --batch-sizes 1,16 \
    --max-tokens 256 --out "$OUT/bench_spec.json" | tail -30
