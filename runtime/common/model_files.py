"""Reading a model's files without the engine: what the gateway needs from its config."""
from __future__ import annotations

import os
from pathlib import Path


def _config_source(path: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) to hand `AutoConfig.from_pretrained`, for an HF
    folder, a .gguf file or a folder holding one .gguf file (as the engine's loader takes)."""
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")
        full = os.path.abspath(path)
        return os.path.dirname(full), os.path.basename(full)
    if any(Path(path).glob("*.safetensors")) or os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(Path(path).glob("*.gguf"))
    if len(ggufs) == 1:
        return str(Path(path).resolve()), ggufs[0].name
    if ggufs:
        raise ValueError(f"{path} holds {len(ggufs)} .gguf files; pass the one to load")
    raise ValueError(f"{path} holds neither config.json + *.safetensors nor a .gguf file")


def read_model_facts(path: str) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of the model at `path` (an HF folder or a .gguf
    file), from its config through `transformers.AutoConfig`; raises if it cannot be read."""
    from transformers import AutoConfig

    folder, gguf_file = _config_source(path)
    hf = AutoConfig.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(folder)
    return int(hf.vocab_size), int(getattr(hf, "max_position_embeddings", 2048))
