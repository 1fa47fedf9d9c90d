"""Reading a model's files without the engine: what the gateway needs from its config."""
from __future__ import annotations

import os
from pathlib import Path


def model_source(path: str) -> tuple[str, str]:
    """("safetensors", the folder) or ("gguf", the .gguf file) for what `--model` names: an
    HF folder (config.json and/or *.safetensors), a .gguf file, or a folder holding exactly
    one .gguf file. The engine's loader and the gateway both read a model through this."""
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")
        return "gguf", path
    if any(Path(path).glob("*.safetensors")) or os.path.isfile(os.path.join(path, "config.json")):
        return "safetensors", path
    ggufs = sorted(Path(path).glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", str(ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds {len(ggufs)} .gguf files; pass the one to load")
    raise ValueError(f"{path} holds neither config.json + *.safetensors nor a .gguf file")


def read_model_facts(path: str) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of the model at `path` (an HF folder or a .gguf
    file), from its config through `transformers.AutoConfig`; raises if it cannot be read."""
    from transformers import AutoConfig

    fmt, source = model_source(path)
    if fmt == "gguf":
        full = os.path.abspath(source)
        hf = AutoConfig.from_pretrained(os.path.dirname(full), gguf_file=os.path.basename(full))
    else:
        hf = AutoConfig.from_pretrained(source)
    return int(hf.vocab_size), int(getattr(hf, "max_position_embeddings", 2048))
