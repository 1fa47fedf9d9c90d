"""`@function`: a Python function of a state becomes a program, run with `.run(...)` or
`.run_batch([...])` against a backend (given, or set once with `set_default_backend`)."""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime.lang.backend.base import Backend
from runtime.lang.calls import ProgramError
from runtime.lang.state import Program, ProgramState

_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    global _default_backend
    _default_backend = backend


def _backend(backend: Backend | None) -> Backend:
    b = backend or _default_backend
    if b is None:
        raise ValueError("no backend: pass backend=RuntimeEndpoint(url) or EngineBackend(engine), "
                         "or call set_default_backend first")
    return b


class SglFunction:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        """Called from another program: runs on that program's state."""
        return self.fn(s, *args, **kwargs)

    def run(self, *args: Any, backend: Backend | None = None, stream: bool = False, **kwargs: Any) -> ProgramState:
        """Run the program; returns its final state. A failed call raises ProgramError
        (naming the call) once no request of the program is in flight any more. With
        stream=True it returns at once: read `state.text_iter()` as the text is produced
        (errors raise there)."""
        program = Program(_backend(backend))
        s = ProgramState(program)
        if not stream:
            _execute(self.fn, program, s, args, kwargs)
            return s

        def body() -> None:
            try:
                _execute(self.fn, program, s, args, kwargs)
            except BaseException as e:  # text_iter raises it
                if s._error is None:
                    s._error = e if isinstance(e, ProgramError) else ProgramError("program", e)

        threading.Thread(target=body, name="lang-program", daemon=True).start()
        return s

    def run_batch(self, batch: list[dict[str, Any]], backend: Backend | None = None, num_threads: int = 16,
                  return_exceptions: bool = False) -> list[ProgramState | BaseException]:
        """Run the program once per keyword-argument dict, up to num_threads at once (their
        requests are batched by the backend). Raises the first failure after every run has
        ended, unless return_exceptions (then the failures take their runs' places)."""
        b = _backend(backend)

        def one(kwargs: dict[str, Any]) -> ProgramState | BaseException:
            try:
                return self.run(backend=b, **kwargs)
            except Exception as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(batch) or 1))) as pool:
            results = list(pool.map(one, batch))
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results


def _execute(fn: Callable[..., Any], program: Program, s: ProgramState, args: tuple, kwargs: dict[str, Any]) -> None:
    try:
        fn(s, *args, **kwargs)
    except BaseException:
        program.cancel.set()  # abort what is in flight: the program will not read it
        program.finish()
        raise
    program.finish()
    s._raise()
    for st in program.states:  # a branch's failure nobody read (never joined) still fails the run
        if st._error is not None and not st._error_seen:
            st._raise()


def function(fn: Callable[..., Any]) -> SglFunction:
    return SglFunction(fn)
