#!/usr/bin/env bash
# What was run on the one-GPU device machine for RESULTS.md's "Serving a Llama-3-8B shape on
# one H200" section (2026-12-02, fifth session), in one script. About 15 minutes on an H200;
# split it where one call is limited to less.
#
# Needs: L8B_DIR = a folder with the Llama-3-8B shape's config.json (vocab 49152, 32 layers,
# hidden 4096, 32/8 heads, intermediate 14336) beside SmolLM2's tokenizer files
# (tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json);
# pyzmq, fastapi and uvicorn importable; flashinfer optional (BACKENDS="triton flashinfer").
set -uo pipefail
OUT=${OUT:-/tmp/out}
L8B_DIR=${L8B_DIR:?set L8B_DIR to the 8B-shape folder}
BACKENDS=${BACKENDS:-triton}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -3
python benchmarks/bench_extend_attention.py --sweep --out "$OUT/ext_l8b.json" | tail -8
python benchmarks/bench_extend_attention.py --heads 9,3,64 --out "$OUT/ext_smol.json" | tail -7
python benchmarks/bench_gemv.py --out "$OUT/bench_gemv.json" | tail -3
for b in $BACKENDS; do
    python benchmarks/bench_engine.py --preset llama3-8b --batch-sizes 8 --input-len 4096 --output-len 1 \
        --kv-cache-tokens 100000 --attention-backend "$b" --out "$OUT/eng_prefill_$b.json" | tail -2
done
python benchmarks/bench_engine.py --preset llama3-8b --batch-sizes 1,64 --input-len 512 --output-len 64 \
    --kv-cache-tokens 100000 --attention-backend triton --out "$OUT/eng_decode.json" | tail -3
python benchmarks/bench_engine.py --preset llama3-8b --batch-sizes 256 --input-len 1024 --output-len 256 \
    --kv-cache-tokens 400000 --attention-backend triton --no-hf --out "$OUT/eng_decode256.json" | tail -2
for b in $BACKENDS; do
    python benchmarks/bench_cluster.py --configs 0x1 --device cuda --datasets random,shared-prefix \
        --concurrency 1,16,64,256 --waves 2 --input-len 1024 --output-len 256 \
        --extra "--model $L8B_DIR --load-format dummy --attention-backend $b" --out "$OUT/cluster_$b.json" \
        | grep -v "^row" | tail -11
done
