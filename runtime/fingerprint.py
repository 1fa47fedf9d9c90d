"""What must match between a controller and the workers that join it: the model (its parsed
architecture and an identity of its weight files), the context length, the page size and the
load format. Path-independent, so each host may keep its copy of the model anywhere.

The KV layout (layers, KV heads, head dim, page size, the dtype each worker resolved) is
checked separately among workers, since only they know their device and so their dtype.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from runtime.config import EngineConfig

SAMPLE_BYTES = 1 << 20  # hashed from each end of each weight file: cheap at 100 GB, catches other weights


def _weight_files(path: str) -> list[Path]:
    if os.path.isfile(path):
        return [Path(path)]
    return sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".gguf"))


def weights_identity(path: str) -> str:
    """sha256 over each weight file's name, size and its first and last MiB. A different
    checkpoint of one architecture differs in these bytes (the safetensors header holds the
    tensor offsets, the data holds the values); hashing whole files would cost minutes."""
    h = hashlib.sha256()
    for f in _weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                fh.seek(size - SAMPLE_BYTES)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def model_fingerprint(engine: EngineConfig, model_path: str) -> dict[str, Any]:
    """The fingerprint of `engine` serving the model at `model_path` (resolved: the default
    model's folder, max_model_len set)."""
    from runtime.engine.weights import load_config_only

    arch = json.dumps(dataclasses.asdict(load_config_only(model_path)), sort_keys=True, default=str)
    weights = "dummy" if engine.load_format == "dummy" else weights_identity(model_path)
    return {
        "model": hashlib.sha256(f"{arch}\0{weights}".encode()).hexdigest()[:16],
        "max_model_len": engine.max_model_len,
        "page_size": engine.page_size,
        "load_format": engine.load_format,
        "seed": engine.seed if engine.load_format == "dummy" else None,  # dummy weights come from it
        # A prefill worker keeps the prompt's hidden states only for EAGLE drafters.
        "eagle": engine.speculative == "eagle",
    }


def mismatch(expected: dict[str, Any], got: dict[str, Any]) -> str:
    """'' when equal, else which fields differ, for the refusal message."""
    diff = [f"{k}: controller {expected.get(k)!r}, worker {got.get(k)!r}"
            for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    return "; ".join(diff)
