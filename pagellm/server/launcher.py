"""Running the app under uvicorn: in the foreground with a graceful drain on
SIGINT/SIGTERM (``pagellm serve``), or in a background thread of this process
(tests, notebooks)."""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn

from pagellm.server.app import build_app
from pagellm.server.async_engine import AsyncEngine


# After the grace period, aborted requests get this long to send their last events
# (they are told at once, not after the engine's step) before uvicorn cancels
# whatever is still open; the engine thread then gets 1 s more (app.py).
_CLOSE_MARGIN_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, draining on SIGINT/SIGTERM and then exiting 0.

    On the first signal the engine refuses new requests (503) and uvicorn
    stops accepting connections and waits for open ones. Requests still
    running ``grace_period`` seconds later are aborted: streams get an error
    event, their usage chunk (when asked for) and ``[DONE]``, others a 503, so
    connections close cleanly; the app's shutdown then stops the engine. The
    process is gone within the grace period plus about 2 s, however long the
    engine's current step. Plain uvicorn re-raises the signal
    once shut down (exit status 130/143); this server does not. A second
    Ctrl-C quits at once.
    """

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, grace_period: float) -> None:
        super().__init__(config)
        self.async_engine = async_engine
        self.grace_period = grace_period

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.async_engine.stop_accepting()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def drain(self) -> None:
        """What a SIGTERM does, callable from any thread."""
        self.handle_exit(signal.SIGTERM, None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.grace_period, self.async_engine.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def make_server(async_engine: AsyncEngine, served_model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, grace_period: float = 30.0, log_level: str = "info",
                max_request_bytes: int | None = None, allowed_origins: Sequence[str] = (),
                enable_docs: bool = True) -> DrainingServer:
    app = build_app(async_engine, served_model_name, api_key, max_request_bytes=max_request_bytes,
                    allowed_origins=allowed_origins, enable_docs=enable_docs)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=grace_period + _CLOSE_MARGIN_S)
    return DrainingServer(config, async_engine, grace_period)


class ServerThread:
    """Run a server in a daemon thread: ``with ServerThread(make_server(..., port=0)) as s: s.url``."""

    def __init__(self, server: DrainingServer, start_timeout: float = 60.0) -> None:
        self.server = server
        self.start_timeout = start_timeout
        self.thread = threading.Thread(target=server.run, name="pagellm-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Drain and wait for the thread to end (it ends within the grace period, plus a little)."""
        self.server.drain()
        self.thread.join(timeout)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
