"""The FastAPI app: routes, API-key check, and the engine's lifetime.

``/health`` and ``/metrics`` are open (load balancers and Prometheus); with an
API key set, everything else needs ``Authorization: Bearer KEY``.
"""
from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pagellm import __version__
from pagellm.server.async_engine import AsyncEngine
from pagellm.server.errors import APIError, install_error_handlers
from pagellm.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
)
from pagellm.server.serving import OpenAIServing, render_chat

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 429, 503)}


def _api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization")
        if given is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not secrets.compare_digest(given.encode(), expected):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return check


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """An app serving ``async_engine`` as ``served_model_name``; the app's shutdown stops the engine."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await async_engine.shutdown()

    app = FastAPI(title="pagellm", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    serving = OpenAIServing(async_engine, served_model_name)
    engine = async_engine.engine
    api = APIRouter(dependencies=[Depends(_api_key_check(api_key))] if api_key else [], responses=_ERRORS)

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

    @api.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @api.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @api.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(body.model)
        tokenizer = _tokenizer(engine)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            try:
                tokens = render_chat(tokenizer, body.messages)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from exc
        else:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @api.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(body.model)
        tokenizer = _tokenizer(engine)
        vocab = engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    app.include_router(api)
    return app


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return engine.tokenizer
