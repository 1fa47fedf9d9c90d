"""The OpenAI completions and chat completions handlers: validate, admit (429 when the queues
are full), tokenize (chat template), check the caps and the context length, run a Generation
and answer as one JSON body or as SSE chunks."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from runtime.common.sampling_params import SamplingParamError, SamplingParams
from runtime.tokenizer.generation import ClientGone, Generation, Update, merge_updates
from runtime.tokenizer.logprobs import TextOffsets, TokenText, chat_logprobs, completion_logprobs
from runtime.tokenizer.prompts import PromptEncoder, prompt_count
from runtime.tokenizer.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
)
from runtime.tokenizer.state import GatewayState
from runtime.tokenizer.structured import Constraint, GrammarChecker, request_constraint, schema_text, with_constraint
from runtime.tokenizer.tools import FORCED, ToolOutput, call_schema, check_tools, tool_mode

log = logging.getLogger("runtime.gateway")

MAX_N = 128  # choices per request: a bound on what one request may ask of the cluster
MAX_STOP = 64  # stop strings: the gateway searches each one after every token of every choice
COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens: OpenAI's default
_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    body = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


def json_response(obj: Any) -> Response:
    return Response(obj.model_dump_json(), media_type="application/json")


class Serving:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.tt = TokenText(state.tokenizer)
        self.encoder = PromptEncoder(state.tokenizer, state.vocab_size)
        self.grammars = GrammarChecker()
        self.grammars.warm(self.encoder.pool)

    def close(self) -> None:
        self.encoder.close()

    # ---- endpoints ---------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        arrival, created = time.monotonic(), int(time.time())
        self._check_common(req)
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (use n)", "best_of")
        count = prompt_count(req.prompt)
        cap = self.state.cfg.max_prompts_per_request
        if count > cap:
            raise APIError(400, f"a request may hold at most {cap} prompts (got {count}); split the batch "
                           "or raise --max-prompts-per-request", "prompt")
        constraint = await self._constraint(request_constraint(req))
        with self.state.admit(count * req.n).released_on_error() as ticket:
            prompts = await self.encoder.completion(req.prompt)
            self._check_request_tokens(prompts, req.n, "prompt")
            # Not sent: OpenAI's default for completions (vLLM's and SGLang's too), within the
            # context; sent as null: the rest of the context.
            default = COMPLETION_MAX_TOKENS if "max_tokens" not in req.model_fields_set else None
            plan = [(ids, self._params(req, ids, req.max_tokens, "max_tokens", req.logprobs, {}, "prompt", constraint,
                                       default)) for ids in prompts]
            gen = Generation(self.state, new_id("cmpl"), plan, arrival, ticket)
        want_lp = req.logprobs is not None
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        first = await self._run(gen, request, req.stream)
        model = self.state.served_name
        if not req.stream:
            choices = [
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=completion_logprobs(self.tt, c.token_ids, c.logprobs, TextOffsets(c.params.skip_special_tokens)) if want_lp else None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids if req.return_token_ids else None,
                )
                for c in gen.choices
            ]
            return json_response(CompletionResponse(id=gen.request_id, created=created, model=model, choices=choices, usage=Usage(**gen.usage())))
        offsets = {c.index: TextOffsets(c.params.skip_special_tokens) for c in gen.choices}

        def chunk(u: Update) -> str | None:
            lp = completion_logprobs(self.tt, u.token_ids, u.logprobs or [], offsets[u.choice.index]) if want_lp and u.token_ids else None
            ids = u.token_ids if req.return_token_ids else None
            if not u.text and lp is None and not ids and not u.finished:
                return None
            choice = CompletionChoice(
                index=u.choice.index, text=u.text, logprobs=lp,
                finish_reason=u.choice.finish_reason if u.finished else None,
                stop_reason=u.choice.stop_reason if u.finished else None,
                token_ids=ids,
            )
            return sse(CompletionResponse(id=gen.request_id, created=created, model=model, choices=[choice]))

        usage = (lambda: CompletionResponse(id=gen.request_id, created=created, model=model, choices=[], usage=Usage(**gen.usage()))) if include_usage else None
        return self._stream(gen, first, [], chunk, usage)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        arrival, created = time.monotonic(), int(time.time())
        self._check_common(req)
        tools = check_tools(req)
        mode = tool_mode(req)
        constraint = request_constraint(req)
        if mode in FORCED:
            if constraint is not None:
                raise APIError(400, f"tool_choice {req.tool_choice if mode == 'required' else 'naming a function'} "
                               f"constrains the output already; drop {constraint.param}", constraint.param)
            name = req.tool_choice.function.name if mode == "named" else None
            constraint = Constraint("json_schema", schema_text(call_schema(tools, name), "tools"), "tools")
        constraint = await self._constraint(constraint, "function parameters schema" if mode in FORCED else None)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:
            max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = req.max_tokens, "max_tokens"
        with self.state.admit(req.n).released_on_error() as ticket:
            ids = await self.encoder.chat(req, tools if mode != "off" else None)
            self._check_request_tokens([ids], req.n, "messages")
            params = self._params(req, ids, max_tokens, max_param, logprobs, {"logprobs": "top_logprobs"}, "messages", constraint)
            gen = Generation(self.state, new_id("chatcmpl"), [(ids, params)], arrival, ticket)
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        first = await self._run(gen, request, req.stream)
        model = self.state.served_name
        outputs = {c.index: ToolOutput(mode) for c in gen.choices}
        if not req.stream:
            choices = []
            for c in gen.choices:
                content, calls, finish = outputs[c.index].message(c.text, c.finish_reason)
                choices.append(ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=content, tool_calls=calls),
                    logprobs=chat_logprobs(self.tt, c.token_ids, c.logprobs) if req.logprobs else None,
                    finish_reason=finish,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids if req.return_token_ids else None,
                ))
            return json_response(ChatCompletionResponse(id=gen.request_id, created=created, model=model, choices=choices, usage=Usage(**gen.usage())))

        def wrap(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=gen.request_id, created=created, model=model, choices=[choice]))

        head = [wrap(ChatStreamChoice(index=c.index, delta={"role": "assistant", "content": ""})) for c in gen.choices]

        def chunk(u: Update) -> str | None:
            lp = chat_logprobs(self.tt, u.token_ids, u.logprobs or []) if req.logprobs and u.token_ids else None
            ids = u.token_ids if req.return_token_ids else None
            deltas, finish = outputs[u.choice.index].stream(u.text, u.choice.text, u.finished, u.choice.finish_reason)
            if not deltas and lp is None and not ids and not u.finished:
                return None
            # Several deltas (a tool call's name, then its arguments) are several chunks; the
            # last carries the update's logprobs, token ids and finish reason.
            heads = [wrap(ChatStreamChoice(index=u.choice.index, delta=d)) for d in deltas[:-1]]
            return "".join(heads) + wrap(ChatStreamChoice(
                index=u.choice.index, delta=deltas[-1] if deltas else {}, logprobs=lp,
                finish_reason=finish if u.finished else None,
                stop_reason=u.choice.stop_reason if u.finished else None,
                token_ids=ids,
            ))

        usage = (lambda: ChatCompletionChunk(id=gen.request_id, created=created, model=model, choices=[], usage=Usage(**gen.usage()))) if include_usage else None
        return self._stream(gen, first, head, chunk, usage)

    # ---- running -----------------------------------------------------------------------------
    async def _run(self, gen: Generation, request: Request, stream: bool) -> Update | None:
        """Start the generation. Non-streaming: run it to the end. Streaming: wait for the
        first update, so an error before any token is still a plain HTTP error."""
        streaming = False
        try:
            await gen.start()
            if stream:
                first = await gen.next(request.is_disconnected)
                streaming = True  # from here on the stream generator owns the generation
                return first
            while await gen.next(request.is_disconnected) is not None:
                pass
            return None
        except ClientGone:
            raise APIError(499, "client disconnected") from None
        finally:
            if not streaming:
                gen.close()

    def _stream(self, gen: Generation, first: Update | None, head: list[str], chunk: Any, usage: Any) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                for h in head:
                    yield h
                u = first
                try:
                    while u is not None:
                        # With the updates already received (the gateway fell behind the
                        # workers, e.g. 256 streams of a fast model): one chunk per choice and
                        # one write for them all, instead of a chunk and a write per token.
                        ready, failed = [u], None
                        try:
                            while (more := gen.next_ready()) is not None:
                                ready.append(more)
                        except Exception as e:  # what came before it is still sent
                            failed = e
                        data = "".join(d for d in map(chunk, merge_updates(ready)) if d is not None)
                        if data:
                            yield data
                        if failed is not None:
                            raise failed
                        u = await gen.next()
                    if usage is not None:
                        yield sse(usage())
                except Exception as e:
                    # Headers are already sent: report the error in the stream itself, and
                    # end the stream properly (an exception escaping here drops the connection).
                    if not isinstance(e, APIError):
                        log.exception("internal error streaming %s", gen.request_id)
                        e = APIError(500, f"internal error: {type(e).__name__}: {e}")
                    self.state.metrics.errors.labels(str(e.status)).inc()
                    yield sse(e.body())
                yield DONE
            finally:
                gen.close()  # a client disconnect cancels this generator: abort the rest

        # The background task also runs when the client left before the stream started.
        return StreamingResponse(
            events(), media_type="text/event-stream", background=BackgroundTask(gen.close),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies: do not buffer
        )

    # ---- validation --------------------------------------------------------------------------
    async def _constraint(self, c: Constraint | None, what: str | None = None) -> Constraint | None:
        """`c`, once xgrammar compiles it (400 otherwise); large new ones off the event loop."""
        if c is None:
            return None
        if self.grammars.inline(c):
            self.grammars.check(c, what)
        else:
            await asyncio.get_running_loop().run_in_executor(self.encoder.pool, self.grammars.check, c, what)
        return c

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model is not None and req.model != self.state.served_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.state.served_name}`", "model")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if req.n > MAX_N:
            raise APIError(400, f"n must be at most {MAX_N} (got {req.n})", "n")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream set to true", "stream_options")
        if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
            raise APIError(400, f"stop may hold at most {MAX_STOP} strings (got {len(req.stop)})", "stop")
        vocab = self.state.vocab_size
        if req.stop_token_ids and not all(0 <= t < vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")

    def _check_request_tokens(self, prompts: list[list[int]], n: int, param: str) -> None:
        total, cap = sum(map(len, prompts)) * n, self.state.cfg.max_request_tokens
        if total > cap:
            times = f" x n = {n}" if n > 1 else ""
            raise APIError(400, f"this request holds {total} prompt tokens ({sum(map(len, prompts))}{times}), more than "
                           f"the {cap} one request may hold; send fewer or shorter prompts, or raise --max-request-tokens", param)

    def _params(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        ids: list[int],
        max_tokens: int | None,
        max_param: str,
        logprobs: int | None,
        rename: dict[str, str],
        prompt_param: str,
        constraint: Constraint | None = None,
        default_max_tokens: int | None = None,
    ) -> SamplingParams:
        """SamplingParams for one prompt; max_tokens None: default_max_tokens or the rest of the
        context, whichever is less."""
        rename = {"max_tokens": max_param, **rename}
        kw = {k: getattr(req, k) for k in _OPTIONAL_SAMPLING if getattr(req, k) is not None}
        try:
            params = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else 1,
                n=req.n,
                stop=req.stop or [],
                seed=req.seed,
                logprobs=logprobs,
                stop_token_ids=req.stop_token_ids or [],
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
                **kw,
            )
        except SamplingParamError as e:
            raise APIError(400, str(e), rename.get(e.param, e.param)) from None
        try:
            params = with_constraint(params, constraint)
        except ValueError as e:  # the engine's own check of a grammar the gateway let through
            raise APIError(400, str(e), constraint.param if constraint else None) from None
        limit, n_prompt = self.state.max_model_len, len(ids)
        if n_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has {n_prompt} tokens; "
                "shorten the prompt",
                prompt_param,
            )
        if max_tokens is None:
            max_tokens = min(limit - n_prompt, default_max_tokens or limit)
        elif n_prompt + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but {n_prompt + max_tokens} were requested "
                f"({n_prompt} in the prompt, {max_tokens} for the completion); reduce the prompt or {max_param}",
                max_param,
            )
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed {max_param} ({max_tokens})", "min_tokens")
        return dataclasses.replace(params, max_tokens=max_tokens)
