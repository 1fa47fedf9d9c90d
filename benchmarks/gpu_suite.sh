#!/usr/bin/env bash
# The engine-core GPU checks, as run on the device machine (see README): GPU tests, then
# the engine-vs-transformers benchmark on SmolLM2 and on a Llama-3-8B-shape dummy model.
# Needs: flashinfer on PYTHONPATH, RUNTIME_TEST_SMOLLM2_DIR = a converted SmolLM2 folder.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python benchmarks/bench_engine.py --model "$RUNTIME_TEST_SMOLLM2_DIR" --batch-sizes 1,64 --input-len 128 --output-len 128 --out "$OUT/bench_smollm2.json" 2>&1 | tail -6
