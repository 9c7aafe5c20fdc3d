"""Every error leaves the server in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Client mistakes are 4xx (400 invalid fields, 401 bad key, 404 unknown route,
413 body too large, 429 overloaded); 503 while shutting down; 500 only for the
server's own bugs (a request the engine could not run says so, and why).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pagellm.server.async_engine import EngineClosed, EngineOverloaded, RequestAborted, RequestFailed
from pagellm.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("pagellm.server")


class APIError(Exception):
    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code, headers=self.headers)


def to_api_error(exc: BaseException, fields: Collection[str] = (), aliases: Mapping[str, str] | None = None
                 ) -> APIError:
    """Map an exception from request handling or the engine to an APIError.

    Engine and SamplingParams ValueErrors start with the name of the field at
    fault ("max_tokens must be ..."); that word, through ``aliases`` (engine
    name -> request field), becomes ``param`` when it is one of ``fields``.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):  # the latter: our own bug
        word = str(exc).split(" ", 1)[0]
        word = (aliases or {}).get(word, word)
        return APIError(400, str(exc), param=word if word in fields else None)
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), "rate_limit_error", code="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, (EngineClosed, RequestAborted)):
        return APIError(503, str(exc), "service_unavailable", code="service_unavailable")
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), "server_error", code="engine_error")
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", "server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, with ``param`` naming the top-level field."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = [str(part) for part in first["loc"][1:] if isinstance(part, int) or _FIELD_NAME.fullmatch(part)]
    if not loc:
        if first["type"] == "missing":
            return APIError(400, "a JSON request body is required")
        return APIError(400, f"the request body is invalid: {first['msg']}")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    param = loc[0] if isinstance(first["loc"][1], str) else None
    message = "is not a parameter of this endpoint" if first["type"] == "extra_forbidden" else first["msg"]
    return APIError(400, f"{'.'.join(loc)}: {message}{more}", param=param)


# A field name in an error's location; pydantic also names union members there ("str", "function-after[...]").
_FIELD_NAME = re.compile(r"(?!(str|int|float|bool|list|dict)$)[A-Za-z_]\w*")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).to_response()

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers).to_response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).to_response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
