"""runtime: a disaggregated, speculative serving runtime for large language models."""
from __future__ import annotations

from typing import Any

from runtime.common.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "Result", "AsyncClient"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import runtime` stays cheap for the CLI and for worker processes.
    if name in ("Engine", "Result"):
        from runtime.engine import llm

        return getattr(llm, name)
    if name == "AsyncClient":
        from runtime.client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
