"""The gateway's FastAPI app: OpenAI routes under /v1 (API key checked when configured),
/health and /metrics, and every error as an OpenAI error object with its HTTP status."""
from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.tokenizer.protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from runtime.tokenizer.serving import Serving
from runtime.tokenizer.state import GatewayState

log = logging.getLogger("runtime.gateway")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


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


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return APIError(400, f"the request body is not valid JSON: {detail}")
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'request body'}: {e.get('msg')}")
    return APIError(400, "; ".join(parts), param)


def build_app(state: GatewayState) -> FastAPI:
    serving = Serving(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="runtime gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state
    if state.cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.cfg.api_key)

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
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await serving.completions(req, request)

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(req, request)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, why, workers = state.health()
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "workers": workers}
        if not ok:
            body["reason"] = why
        return JSONResponse(body, status_code=200 if ok else 503)

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
        return failed(_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return failed(APIError(e.status_code, detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return failed(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    return app
