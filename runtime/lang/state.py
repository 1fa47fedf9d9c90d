"""A program's state: its text, chat messages and captured values. Each state runs what is
appended to it (`s += gen(...)`) on its own thread, in order, so a fork's branches run at
once (their requests batched by the backend) while the program's Python code goes on;
reading a value (`s["name"]`, `s.text()`) waits for the calls before it."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from runtime.lang.calls import ProgramError, run_call
from runtime.lang.chat import RoleRenderer
from runtime.lang.ir import Gen, Role, Select, Seq
from runtime.lang.backend.base import Backend


class Program:
    """What the states of one `run` share: the backend, the role renderer, a cancel flag
    (set when the program fails: in-flight requests are aborted) and the states made."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.roles = RoleRenderer(backend.render_chat)
        self.cancel = threading.Event()
        self.states: list[ProgramState] = []
        self.lock = threading.Lock()

    def finish(self) -> None:
        """Wait for every state's calls (none left in flight), then stop their threads."""
        for st in list(self.states):
            st._wait()
            st._stop()


class ProgramState:
    def __init__(self, program: Program, text: str = "", messages: list[dict[str, str]] | None = None,
                 values: dict[str, Any] | None = None) -> None:
        self.program = program
        self._text = text
        self._messages = list(messages or [])
        self._values = dict(values or {})
        self._meta: dict[str, dict[str, Any]] = {}
        self._error: ProgramError | None = None
        self._error_seen = False
        self._pending = 0
        self._closed = False
        self._events: list[tuple[str | None, str]] = []  # (value name or None, text) in order, for text_iter
        self._cond = threading.Condition()
        self._ops: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="lang-state", daemon=True)
        with program.lock:
            program.states.append(self)
        self._thread.start()

    # ---- building ---------------------------------------------------------------------------
    def __iadd__(self, item: str | Gen | Select | Role | Seq) -> ProgramState:
        if not isinstance(item, (str, Gen, Select, Role, Seq)):
            raise TypeError(f"a state takes text, gen(...), select(...) and role blocks (got {type(item).__name__})")
        with self._cond:
            self._pending += 1
        self._ops.put(item)
        return self

    def fork(self, n: int) -> Forks:
        """n states that continue from this one's text. Its text is computed once first, so
        every branch finds it in the prefix cache."""
        if n < 1:
            raise ValueError(f"fork(n) needs n >= 1 (got {n})")
        self.sync()
        if n > 1 and self._text:
            try:
                self.program.backend.cache_prefix(self._text)
            except Exception as e:
                raise ProgramError("fork", e) from e
        return Forks(ProgramState(self.program, self._text, self._messages, self._values) for _ in range(n))

    def join(self, forks: list[ProgramState]) -> None:
        """Wait for every branch; raise the first branch's error (after all have ended)."""
        for f in forks:
            f._wait()
        for f in forks:
            f._raise()

    # ---- reading ----------------------------------------------------------------------------
    def sync(self) -> None:
        """Wait for the calls appended so far; raise the ProgramError of one that failed."""
        self._wait()
        self._raise()

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self._values:
            raise KeyError(f"no value named {name!r} (captured: {sorted(self._values)})")
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._values

    def text(self) -> str:
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, str]]:
        self.sync()
        return list(self._messages)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """What the backend reported for the call that captured `name`: for a gen
        prompt_tokens, cached_tokens, completion_tokens and finish_reason; for a select the
        per-choice mean_logprobs and token logprobs."""
        self.sync()
        return self._meta[name]

    def text_iter(self, name: str | None = None) -> Iterator[str]:
        """The text appended to this state as it is produced (a gen's pieces as they are
        generated); only value `name`'s with a name. Ends when the program ends; raises its
        ProgramError then."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._closed:
                    self._cond.wait()
                batch, done = self._events[i:], self._closed
                i = len(self._events)
            for var, piece in batch:
                if name is None or var == name:
                    yield piece
            if done and i >= len(self._events):
                break
        self._raise()

    # ---- the state's thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._ops.get()
            if item is None:
                return
            try:
                if self._error is None and self.program.cancel.is_set():
                    # Reading this state's values must say why they are missing.
                    self._error = ProgramError(_call_label(item),
                                               "not run: the program was cancelled (another call failed)")
                elif self._error is None:
                    run_call(self, item)
            except ProgramError as e:
                self._error = e
            except BaseException as e:  # a bug in a call: still a failure of that call
                self._error = ProgramError(getattr(item, "label", "text"), e)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _append(self, text: str, name: str | None = None, emit: bool = True) -> None:
        self._text += text
        if emit:
            self._emit(text, name)

    def _emit(self, text: str, name: str | None = None) -> None:
        with self._cond:
            self._events.append((name, text))
            self._cond.notify_all()

    def _wait(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()

    def _raise(self) -> None:
        if self._error is not None:
            self._error_seen = True
            raise self._error

    def _stop(self) -> None:
        self._ops.put(None)
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _call_label(item: str | Gen | Select | Role | Seq) -> str:
    """The first gen or select an appended item holds ("gen 'x'"), else "text"."""
    if isinstance(item, (Gen, Select)):
        return item.label
    for it in item.items if isinstance(item, (Seq, Role)) else ():
        label = _call_label(it)
        if label != "text":
            return label
    return "text"


class Forks(list):
    """The branches of `s.fork(n)`; `forks.join()` is `s.join(forks)`."""

    def join(self) -> None:
        if self:
            self[0].join(self)
