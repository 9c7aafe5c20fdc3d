"""The FastAPI app: routes, the request guard, CORS, and the engine's lifetime.

``/health`` and ``/metrics`` are open (load balancers and Prometheus); with an
API key set, everything else (``/docs`` and ``/openapi.json`` included) needs
``Authorization: Bearer KEY``, checked by ``guard.RequestGuard`` before any
body is read. ``enable_docs=False`` removes the docs and the schema.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pagellm import __version__
from pagellm.server.async_engine import AsyncEngine
from pagellm.server.errors import APIError, install_error_handlers
from pagellm.server.guard import RequestGuard, default_max_request_bytes
from pagellm.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
)
from pagellm.server.serving import OpenAIServing

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 503)}
_ENGINE_JOIN_S = 1.0   # at shutdown, how long a step in progress may keep the engine thread


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              max_request_bytes: int | None = None, allowed_origins: Sequence[str] = (),
              enable_docs: bool = True) -> FastAPI:
    """An app serving ``async_engine`` as ``served_model_name``; the app's shutdown stops the engine.
    ``max_request_bytes`` defaults to ``guard.default_max_request_bytes(max_model_len)``."""
    engine = async_engine.engine
    serving = OpenAIServing(async_engine, served_model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        serving.close()
        await async_engine.shutdown(timeout=_ENGINE_JOIN_S)

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="pagellm", version=__version__, lifespan=lifespan, responses=_ERRORS, **docs)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key,
                       max_body_bytes=max_request_bytes or default_max_request_bytes(engine.max_model_len))
    if allowed_origins:   # outermost, so that preflight requests (which carry no key) are answered
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.accepting:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(async_engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name, max_model_len=engine.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(body)

    return app
