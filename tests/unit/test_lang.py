"""runtime.lang on an in-process Engine (tiny model): role blocks render exactly as the chat
template, a gen inside assistant() answers as Engine.chat does, and clear errors for a
program written wrong."""
from __future__ import annotations

import pytest

from runtime import Engine, SamplingParams
from runtime.lang import EngineBackend, assistant, function, gen, select, set_default_backend, system, user


@pytest.fixture(scope="module")
def backend(tiny_model_dir: str):
    b = EngineBackend(Engine(tiny_model_dir, device="cpu", dtype="float32", page_size=4))
    yield b
    b.close()
    b.engine.shutdown()


@function
def chat(s, question: str):
    s += system("You are brief.")
    s += user(question)
    s += assistant(gen("answer", max_tokens=8))


def test_roles_render_as_the_chat_template_and_answer_as_engine_chat(backend: EngineBackend) -> None:
    s = chat.run(question="What is the capital of France?", backend=backend)
    messages = s.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert s.text() == backend.tokenizer.apply_chat_template(messages, tokenize=False)
    ref = backend.engine.chat([messages[:2]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert s["answer"] == ref.text
    assert s.get_meta_info("answer")["completion_tokens"] == len(ref.token_ids)


def test_default_backend(backend: EngineBackend) -> None:
    with pytest.raises(ValueError, match="no backend"):
        chat.run(question="hi")
    set_default_backend(backend)
    try:
        assert chat.run(question="hi")["answer"] == chat.run(question="hi", backend=backend)["answer"]
    finally:
        set_default_backend(None)


def test_program_written_wrong() -> None:
    with pytest.raises(ValueError, match="choices must be non-empty strings"):
        select("x", choices=[])
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        gen("x", max_tokens=0)
    with pytest.raises(TypeError, match="join with \\+"):
        "a" + gen("x") + 3  # noqa: B018
    with pytest.raises(TypeError, match="takes text, gen"):
        user(42)


def test_calls_left_when_the_program_is_cancelled_say_so(backend: EngineBackend) -> None:
    """A call still queued when the program is cancelled (another call failed) is not run, and
    reading what it would have captured raises a ProgramError naming it, not a KeyError."""
    from runtime.lang import ProgramError
    from runtime.lang.state import Program, ProgramState

    program = Program(backend)
    s = ProgramState(program, "Hello")
    program.cancel.set()
    s += " there" + gen("rest", max_tokens=4)
    with pytest.raises(ProgramError, match="gen 'rest' failed: not run: the program was cancelled"):
        s["rest"]
    program.finish()
