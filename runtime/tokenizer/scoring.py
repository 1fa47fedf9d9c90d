"""Extensions for runtime.lang (README "Structured generation"): POST /v1/score, the logprob
of each token of given continuations of a prompt (what `select` ranks choices by), and
POST /v1/chat/template, the chat template applied to messages without generating (how a
remote program renders its role blocks exactly as the server's tokenizer would).

A score request is two rounds through the real workers: the prompt alone (max_tokens 1, so
its KV lands in the prefill worker's prefix cache), then every continuation at once with
`prompt_logprobs_start` at the split: prefix-aware routing sends them to the worker that
holds the prompt, whose scheduler prefills them as one batch over the shared pages."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from runtime.common.continuations import split_continuations
from runtime.common.sampling_params import SamplingParams
from runtime.tokenizer.generation import Generation
from runtime.tokenizer.protocol import APIError, ChatMessage, Int, PromptTokensDetails, Usage, _Request, new_id

MAX_CONTINUATIONS = 128  # as MAX_N: a bound on what one request may ask of the cluster


class ScoreRequest(_Request):
    model: str | None = None
    prompt: str | list[Int]
    continuations: list[str] | list[list[Int]]


class ContinuationLogprobs(BaseModel):
    index: int
    token_ids: list[int]
    logprobs: list[float]
    logprob_sum: float
    mean_logprob: float  # what `select` ranks by (length-normalised)


class ScoreResponse(BaseModel):
    id: str
    object: str = "score"
    model: str
    data: list[ContinuationLogprobs]
    usage: Usage


class ChatTemplateRequest(_Request):
    messages: list[ChatMessage]
    add_generation_prompt: bool = False


class ChatTemplateResponse(BaseModel):
    prompt: str


def _json(obj: BaseModel) -> Response:
    return Response(obj.model_dump_json(), media_type="application/json")


class ScoreServing:
    def __init__(self, serving: Any) -> None:  # runtime.tokenizer.serving.Serving
        self.serving = serving
        self.state = serving.state

    async def score(self, req: ScoreRequest, request: Request) -> Response:
        state = self.state
        if req.model is not None and req.model != state.served_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{state.served_name}`", "model")
        if not req.continuations or len(req.continuations) > MAX_CONTINUATIONS:
            raise APIError(400, f"continuations must hold 1 to {MAX_CONTINUATIONS} entries", "continuations")
        if isinstance(req.prompt, str) != all(isinstance(c, str) for c in req.continuations):
            raise APIError(400, "a text prompt takes text continuations, a token-id prompt token-id ones", "continuations")
        encoder = self.serving.encoder
        chars = len(req.prompt) + sum(len(c) for c in req.continuations)
        try:
            ctx, conts = await encoder.run(chars, split_continuations, lambda t: encoder._encode([t])[0],
                                           req.prompt, req.continuations)
        except ValueError as e:
            raise APIError(400, str(e), "continuations") from None
        for ids in [ctx, *conts]:
            encoder.check_ids(ids, "prompt")
        longest = len(ctx) + max(map(len, conts))
        if longest >= state.max_model_len:
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens, but prompt and "
                           f"continuation hold {longest}", "continuations")
        if len(conts) > 1:  # the prompt's KV into the prefix cache, for the continuations to share
            await self._run([(ctx, SamplingParams(max_tokens=1, temperature=0.0))], request)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs_start=len(ctx))
        gen = await self._run([(ctx + c, params) for c in conts], request)
        data = []
        for c, ids in zip(gen.choices, conts):
            lps = c.prompt_logprobs
            if len(lps) != len(ids):
                raise APIError(500, f"continuation {c.index}: {len(lps)} logprobs for {len(ids)} tokens")
            data.append(ContinuationLogprobs(index=c.index, token_ids=ids, logprobs=lps, logprob_sum=sum(lps),
                                             mean_logprob=sum(lps) / len(lps)))
        usage = gen.usage()
        usage["total_tokens"] = usage["prompt_tokens"]  # the sampled token is not part of the answer
        usage["completion_tokens"] = 0
        usage["prompt_tokens_details"] = PromptTokensDetails(**usage["prompt_tokens_details"])
        return _json(ScoreResponse(id=gen.request_id, model=state.served_name, data=data, usage=Usage(**usage)))

    async def _run(self, plan: list[tuple[list[int], SamplingParams]], request: Request) -> Generation:
        with self.state.admit(len(plan)).released_on_error() as ticket:
            gen = Generation(self.state, new_id("score"), plan, ticket=ticket)
        await self.serving._run(gen, request, stream=False)
        return gen

    async def chat_template(self, req: ChatTemplateRequest) -> Response:
        tokenizer = self.state.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template", "messages")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=False)
        except Exception as e:  # jinja raises its own types for templates that reject input
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
        return _json(ChatTemplateResponse(prompt=text))



