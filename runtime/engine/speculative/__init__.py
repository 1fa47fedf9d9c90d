"""Speculative decoding: drafters propose tokens, the engine verifies them in one forward
(see EngineCore._accept for the acceptance rule)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.engine.speculative.base import Drafter
from runtime.engine.speculative.policy import SpeculationPolicy

if TYPE_CHECKING:
    from runtime.engine.core import EngineCore

__all__ = ["Drafter", "SpeculationPolicy", "make_drafter"]


def make_drafter(kind: str, core: "EngineCore") -> Drafter | None:
    cfg = core.cfg
    if kind == "none":
        return None
    if kind == "ngram":
        from runtime.engine.speculative.ngram import NgramDrafter

        return NgramDrafter()
    if kind == "draft":
        if not cfg.draft_model:
            raise ValueError("--speculative draft needs --draft-model (a smaller model with the same tokenizer)")
        from runtime.engine.speculative.draft_model import DraftModelDrafter

        return DraftModelDrafter(core)
    if kind == "eagle":
        if not cfg.draft_model:
            raise ValueError("--speculative eagle needs --draft-model (a head trained by `runtime train-draft`)")
        from runtime.engine.speculative.eagle import EagleDrafter

        return EagleDrafter(core)
    raise ValueError(f"unknown speculative method {kind!r}")
