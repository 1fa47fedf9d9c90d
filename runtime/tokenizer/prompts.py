"""Request prompts to token ids: completion prompts (a text, token ids, or a batch of either)
and chat messages through the model's template, checked against the vocabulary. Large
inputs are tokenised on a thread pool (the Rust tokenizer releases the GIL), so a megabyte
prompt does not stall the event loop, /health included, for seconds; small ones inline,
where the thread hop would cost more than the work."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from runtime.tokenizer.protocol import APIError, ChatCompletionRequest, Tool
from runtime.tokenizer.tools import render_messages, template_handles_tools

T = TypeVar("T")

# Characters of text tokenised on the event loop. Measured on the 2-core CI machine with a
# byte-level BPE: 1,000 characters take ~0.8 ms, a thread-pool round trip ~0.1 ms, and
# 2 MB took 1.7-3.4 s (then /health waited as long).
INLINE_CHARS = 1024


def prompt_count(prompt: str | list[Any]) -> int:
    """How many prompts a completions `prompt` holds, without tokenising it."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def text_size(obj: Any, limit: int) -> int:
    """Characters in the strings of a JSON value, counted up to just past `limit` (so a
    huge message costs no more to measure than a small one)."""
    total, stack = 0, [obj]
    while stack and total <= limit:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return total


class PromptEncoder:
    def __init__(self, tokenizer: Any, vocab_size: int, threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # transformers resets a fast tokenizer's truncation and padding (a mutation) on every
        # call where they are set; from two threads at once that is "Already borrowed".
        # Untruncated, unpadded is how the gateway always calls it: set that once, here.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            if backend.truncation is not None:
                backend.no_truncation()
            if backend.padding is not None:
                backend.no_padding()
        self.pool = ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1), thread_name_prefix="tokenize")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, on the pool when `chars` of input make it worth the thread hop."""
        if chars <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- completions -----------------------------------------------------------------------
    async def completion(self, prompt: str | list[Any]) -> list[list[int]]:
        """The token ids of each prompt of a completions request."""
        if isinstance(prompt, str):
            texts = [prompt]
        elif not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        elif isinstance(prompt[0], int):
            return [self.check_ids(list(prompt), "prompt")]
        elif isinstance(prompt[0], str):
            texts = prompt
        else:
            return [self.check_ids(list(p), "prompt") for p in prompt]
        encoded = await self.run(sum(map(len, texts)), self._encode, texts)
        return [self.check_ids(ids, "prompt") for ids in encoded]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    # ---- chat ------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, tools: list[Tool] | None = None) -> list[int]:
        """The token ids of the chat template applied to the request's messages (and tools,
        see tools.py for how they are rendered)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt", "messages")
        messages = []
        for m in req.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text":
                        raise APIError(400, f"message content of type {part.type!r} is not supported (text only)", "messages")
                    if part.text is None:
                        raise APIError(400, "a message content part of type 'text' needs its 'text'", "messages")
                    texts.append(part.text)
                d["content"] = "\n".join(texts)
            messages.append(d)
        messages, tool_list = render_messages(messages, tools or [], template_handles_tools(template))
        size = text_size([messages, tool_list], INLINE_CHARS)
        ids = await self.run(size, self._template, messages, req.add_generation_prompt, tool_list)
        return self.check_ids(ids, "messages")

    def _template(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as e:  # jinja raises its own types for templates that reject input
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    # ---- checks ----------------------------------------------------------------------------
    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param)
        return ids
