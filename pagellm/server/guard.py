"""What every HTTP request meets first, before any of its body is read (a pure
ASGI middleware, inside CORS and outside the app):

- the API key, when one is set, for every path but ``/health`` and
  ``/metrics`` (``/docs`` and ``/openapi.json`` included): a request without
  it gets its 401 before a byte of its body is read or parsed;
- the body size: a ``Content-Length`` above the limit is refused at once with
  413, and a body sent without one is counted as it arrives and refused as
  soon as it passes the limit. The body is read here and handed on whole, so
  the app never holds more than the limit; later ``receive`` calls go to the
  client as before (disconnects are still seen).
"""
from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pagellm.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def default_max_request_bytes(max_model_len: int) -> int:
    """64 bytes per token of context (a full-length prompt as text, JSON-escaped
    text or token ids fits several times over), at least 1 MiB."""
    return max(1 << 20, 64 * max_model_len)


class RequestGuard:
    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check_key(scope) or self._check_length(scope)
        if error is None:
            body, error = await self._read_body(receive)
        if error is not None:
            await error.to_response()(scope, receive, send)
        elif body is not None:   # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _check_key(self, scope: Message) -> APIError | None:
        if self.expected is None or scope["path"] in OPEN_PATHS:
            return None
        given = dict(scope["headers"]).get(b"authorization")
        if given is None:
            return APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not secrets.compare_digest(given, self.expected):
            return APIError(401, "incorrect API key provided", code="invalid_api_key")
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes (--max-request-bytes)",
                        code="request_too_large")

    def _check_length(self, scope: Message) -> APIError | None:
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then defers to the client's."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
