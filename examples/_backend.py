"""The examples' command line: `--url URL` runs against a `runtime up` server, otherwise an
in-process Engine on `--model` (default: the embedded SmolLM2)."""
from __future__ import annotations

import argparse

from runtime.lang import Backend, EngineBackend, RuntimeEndpoint


def backend_from_args(description: str) -> Backend:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", help="a runtime up server (default: an in-process Engine)")
    p.add_argument("--api-key")
    p.add_argument("--model", help="for the in-process Engine (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.url:
        return RuntimeEndpoint(a.url, api_key=a.api_key)
    from runtime import Engine

    return EngineBackend(Engine(a.model, device=a.device, dtype="float32"))
