"""runtime.lang: the structured generation language (SGLang's frontend) over a `runtime up`
server (`RuntimeEndpoint`) or an in-process `runtime.Engine` (`EngineBackend`).

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    state = qa.run(question="...", backend=EngineBackend(engine))
    state["answer"]
"""
from __future__ import annotations

from runtime.lang.backend.base import Backend, BackendError
from runtime.lang.backend.endpoint import RuntimeEndpoint
from runtime.lang.backend.engine import EngineBackend
from runtime.lang.calls import ProgramError
from runtime.lang.function import SglFunction, function, set_default_backend
from runtime.lang.ir import assistant, gen, select, system, user
from runtime.lang.state import ProgramState

__all__ = [
    "function", "gen", "select", "system", "user", "assistant", "RuntimeEndpoint", "EngineBackend",
    "set_default_backend", "ProgramError", "BackendError", "Backend", "ProgramState", "SglFunction",
]
