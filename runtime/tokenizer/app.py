"""The gateway's FastAPI app: OpenAI routes under /v1 (API key checked when configured),
/health and /metrics, and every error as an OpenAI error object with its HTTP status:
whatever the body holds, bad input is a 400, and a bug a 500 that closes the connection."""
from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.tokenizer.protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from runtime.tokenizer.scoring import ChatTemplateRequest, ScoreRequest, ScoreServing
from runtime.tokenizer.serving import Serving
from runtime.tokenizer.state import GatewayState

log = logging.getLogger("runtime.gateway")
R = TypeVar("R", bound=BaseModel)

# What a union's failure names the field as (pydantic reports one error per member).
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class InternalErrorMiddleware:
    """A bug in a handler: a 500 with an OpenAI error object and `Connection: close`.
    Without this, Starlette's ServerErrorMiddleware sends the app's 500 and then re-raises;
    uvicorn, seeing an exception after the response started, drops the connection, and a
    keep-alive client's next request on it fails with a reset."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = complete = False

        async def watch(message: Message) -> None:
            nonlocal started, complete
            started = started or message["type"] == "http.response.start"
            complete = complete or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if complete:
                return  # (a background task) the client has its whole answer: keep the connection
            if started:
                raise  # the status line is out: only closing the connection can tell the client
            self.count(500)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", headers={"Connection": "close"})
            await error_response(err)(scope, receive, send)


# The largest request body read: far above any request --max-request-tokens admits at its
# default (262,144 tokens), far below what would strain the gateway's memory.
MAX_BODY_BYTES = 64 << 20


async def read_json(request: Request, model: type[R]) -> R:
    """The request body as `model`. Parsed from the raw bytes by pydantic's JSON parser, which
    refuses invalid UTF-8 and lone surrogates (`\\ud800`, which Python's json module would
    pass on to the tokenizer) and nesting too deep to walk."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.partition(";")[0].strip().lower()
    if mime and mime != "application/json" and not mime.endswith("+json"):
        raise APIError(400, f"the request body must be JSON, sent with Content-Type: application/json (got {ctype!r})")
    # Answered before the rest of the body is read: the connection closes after it.
    too_big = APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", headers={"Connection": "close"})
    try:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise too_big
    except ValueError:
        raise APIError(400, "the Content-Length header is not a number") from None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


class APIKeyMiddleware:
    """401 for /v1 requests without `Authorization: Bearer <key>`. A plain ASGI middleware
    (not BaseHTTPMiddleware), so streaming and disconnect detection pass through untouched;
    it runs before the body is parsed, so a bad key is 401 even with a bad body."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = "Incorrect API key provided" if auth else "Missing API key: send `Authorization: Bearer <key>`"
                await error_response(APIError(401, msg))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_union_tag(x: Any) -> bool:
    # Field names are snake_case; pydantic names union members by type: str, list[str], TextPart
    return isinstance(x, str) and (not x.isidentifier() or x[:1].isupper() or x in ("str", "int", "float", "bool"))


def _validation_error(errors: Any) -> APIError:
    errors = list(errors)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = str((first.get("ctx") or {}).get("error", first.get("msg")))
        if "surrogate" in detail or "escape" in detail or "unicode" in detail:
            detail += " (strings must be valid Unicode: UTF-8, and no lone UTF-16 surrogate such as \\ud800)"
        return APIError(400, f"the request body is not valid JSON: {detail}")
    parts, param = [], None
    for e in errors:
        loc = [x for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = str(loc[0])
        # A union member's tag (`str`, `list[str]`, `TextPart`...) ends the field's path.
        cut = next((i for i, x in enumerate(loc) if _is_union_tag(x)), None)
        field = [str(x) for x in loc[:cut]] if cut is not None else [str(x) for x in loc]
        name = field[-1] if field else ""
        text = f"must be {_EXPECTED[name]}" if cut is not None and name in _EXPECTED else str(e.get("msg"))
        part = f"{'.'.join(field) or 'request body'}: {text}"
        if part not in parts:
            parts.append(part)
    return APIError(400, "; ".join(parts[:3]), param)


def build_app(state: GatewayState) -> FastAPI:
    serving = Serving(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()
            serving.close()

    app = FastAPI(title="runtime gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state
    if state.cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.cfg.api_key)
    # Added last, so outermost of the app's own middleware: it sees every exception.
    app.add_middleware(InternalErrorMiddleware, count=lambda status: state.metrics.errors.labels(str(status)).inc())

    v1 = APIRouter(prefix="/v1")

    def model_card() -> ModelCard:
        return ModelCard(id=state.served_name, max_model_len=state.max_model_len)

    @v1.get("/models")
    async def models() -> Response:
        return Response(ModelList(data=[model_card()]).model_dump_json(), media_type="application/json")

    @v1.get("/models/{model:path}")
    async def model(model: str) -> Response:
        if model != state.served_name:
            raise APIError(404, f"The model `{model}` does not exist", "model")
        return Response(model_card().model_dump_json(), media_type="application/json")

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(await read_json(request, CompletionRequest), request)

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await serving.chat(await read_json(request, ChatCompletionRequest), request)

    scoring = ScoreServing(serving)

    @v1.post("/score")
    async def score(request: Request) -> Response:
        return await scoring.score(await read_json(request, ScoreRequest), request)

    @v1.post("/chat/template")
    async def chat_template(request: Request) -> Response:
        return await scoring.chat_template(await read_json(request, ChatTemplateRequest))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, why, workers = state.health()
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "workers": workers}
        if not ok:
            body["reason"] = why
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        # Liveness of the gateway + controller pod: the controller still reports, whether or
        # not workers have joined (readiness is /health, which needs a live worker per role).
        ok = state.controller_alive()
        return JSONResponse({"status": "ok" if ok else "no cluster status from the controller"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- errors: always {"error": {message, type, param, code}} --------------------------------
    def failed(e: APIError) -> JSONResponse:
        state.metrics.errors.labels(str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return failed(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return failed(_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return failed(APIError(e.status_code, detail))

    return app
