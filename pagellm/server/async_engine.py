"""Drive one LLMEngine from asyncio: one thread steps the model, the event loop serves requests.

LLMEngine is not thread-safe and its steps block, so a single background thread
owns it. Callers on any asyncio loop queue commands (add, abort, stop); the
thread applies them between steps, steps while any request is unfinished, and
otherwise sleeps on the command queue (no busy wait). Outputs go back through
``loop.call_soon_threadsafe`` into each caller's RequestStream, one callback
per loop per step, so any number of HTTP requests wait without a thread each.

Bounds: a submission may ask for at most ``max_seqs_per_request`` sequences
(prompts x n) and is refused while the sequences waiting (queued here or in
the engine) plus its own would exceed ``max_waiting``. ``stats`` reads the
engine's counters live, so /metrics does not wait for a step to end, and
``abort_all`` tells every caller at once, even in the middle of a long step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagellm.engine.llm_engine import LLMEngine
from pagellm.inputs import Prompt
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.server.metrics import RequestProgress, ServerMetrics

logger = logging.getLogger("pagellm.server")



class EngineOverloaded(RuntimeError):
    """The waiting queue is at its bound (``max_waiting``): retry later."""


class EngineClosed(RuntimeError):
    """The engine takes no new requests: it is draining or has stopped."""


class RequestAborted(RuntimeError):
    """A request was ended by the server (shutdown or an engine failure), not by its caller."""


class RequestFailed(RuntimeError):
    """The engine could not run this request (and only this one): ``LLMEngine._execute``."""


_ACCEPTED = object()   # posted to a stream once all its prompts are queued in the engine
_ABORT_ALL = object()  # command: abort every unfinished request, telling its caller
_STOP = object()       # command: abort everything and end the engine thread


class RequestStream:
    """The outputs of one submission (one or more engine requests) as an async iterator.

    Outputs are cumulative, so when several are pending for a request only the
    latest is kept: a slow reader skips intermediate states instead of falling
    behind. Iteration ends once every request has finished.
    """

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.request_ids = request_ids
        self.loop = loop
        self.accepted: asyncio.Future[None] = loop.create_future()
        self._unfinished = set(request_ids)
        self._ready: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()

    @property
    def unfinished_ids(self) -> list[str]:
        return [i for i in self.request_ids if i in self._unfinished]

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def receive(self, item: object) -> None:
        """Take one posting from the engine thread (runs on ``self.loop``)."""
        if not self.accepted.done():
            if isinstance(item, BaseException):
                self.accepted.set_exception(item)
            else:
                self.accepted.set_result(None)
            return
        if isinstance(item, BaseException):
            self._error = item
        elif isinstance(item, RequestOutput):
            self._ready[item.request_id] = item
        self._wakeup.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._ready:
            if self._error is not None:   # unfinished_ids still names what the caller should abort
                raise self._error
            if not self._unfinished:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        output = self._ready.pop(next(iter(self._ready)))
        if output.finished:
            self._unfinished.discard(output.request_id)
        return output


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[Prompt]
    params: SamplingParams
    arrival_time: float

    @property
    def num_seqs(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class _Abort:
    request_ids: tuple[str, ...]


def _deliver(items: list[tuple[RequestStream, object]]) -> None:
    for stream, item in items:
        stream.receive(item)


class AsyncEngine:
    """Owns an LLMEngine and its step thread; ``submit``/``generate`` from any asyncio loop.

    ``max_waiting`` bounds the waiting sequences: a submission that would take
    them past it is refused with EngineOverloaded; one asking for more than
    ``max_seqs_per_request`` sequences with ValueError (None: no bound).
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 max_seqs_per_request: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_seqs_per_request = max_seqs_per_request
        self.metrics = ServerMetrics(self.stats)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()   # orders "still accepting? then enqueue" against closing
        self._pending_seqs = 0          # sequences submitted, not yet added to the engine
        self._streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()   # accepted, maybe unfinished
        self._accepting = True
        self._progress: dict[str, tuple[RequestStream, RequestProgress]] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = defaultdict(list)
        self._thread = threading.Thread(target=self._run, name="pagellm-engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting and self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        """The engine thread has ended."""
        return not self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """The engine's counters now, submissions not yet applied counted as waiting (safe from any thread)."""
        stats = self.engine.stats()
        stats["num_waiting"] += self._pending_seqs
        return stats

    async def submit(self, request_id: str, prompts: list[Prompt], params: SamplingParams) -> RequestStream:
        """Queue ``prompts`` as one unit: all are accepted or none is.

        Engine request ids are ``request_id`` for one prompt, ``request_id-i``
        for several. Raises, before any output: ValueError for invalid input
        (the message names the field), EngineOverloaded, EngineClosed.
        """
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(ids, asyncio.get_running_loop())
        command = _Add(stream, prompts, params, time.monotonic())
        if self.max_seqs_per_request is not None and command.num_seqs > self.max_seqs_per_request:
            raise ValueError(f"n x prompts = {params.n} x {len(prompts)} = {command.num_seqs} sequences, more than "
                             f"the {self.max_seqs_per_request} this server runs for one request")
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the server is shutting down and takes no new requests")
            self._pending_seqs += command.num_seqs
            self._commands.put(command)
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.abort(*ids)
            raise
        with self._lock:
            self._streams.add(stream)
        return stream

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; leaving the loop early aborts it."""
        stream = await self.submit(request_id, [prompt], params)
        try:
            async for output in stream:
                yield output
        finally:
            self.abort(*stream.unfinished_ids)

    def abort(self, *request_ids: str) -> None:
        """Abort requests (unknown or finished ids are ignored); their KV blocks are
        freed before the next step."""
        if request_ids:
            self._commands.put(_Abort(request_ids))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; running ones go on (the start of a drain).
        Lock-free, so a signal handler may call it."""
        self._accepting = False

    def abort_all(self) -> None:
        """Abort every unfinished request (the end of a drain): callers get RequestAborted
        now, the engine frees their blocks after its current step."""
        error = RequestAborted("the server is shutting down and aborted the request")
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            if not stream.finished:
                stream.loop.call_soon_threadsafe(stream.receive, error)
        self._commands.put(_ABORT_ALL)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Abort whatever is unfinished (its callers get RequestAborted) and end the
        thread, waiting at most ``timeout`` seconds for a step in progress."""
        with self._lock:
            self._accepting = False
            self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)

    # ---- engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
        except Exception:
            logger.exception("the engine thread failed")
        finally:
            self._close()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if ``block``); False once told to stop."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        keep_running = True
        for command in commands:
            if command is _STOP:
                keep_running = False
            elif command is _ABORT_ALL:
                self._fail_all(RequestAborted("the server is shutting down and aborted the request"))
            elif isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_ids)
        self._flush()
        return keep_running

    def _add(self, command: _Add) -> None:
        stream = command.stream
        num_seqs = command.num_seqs
        with self._lock:
            self._pending_seqs -= num_seqs
        waiting = self.engine.stats()["num_waiting"]
        if self.max_waiting is not None and waiting + num_seqs > self.max_waiting:
            self.metrics.requests_rejected.labels("overloaded").inc()
            self._post(stream, EngineOverloaded(
                f"the server is overloaded: {waiting} sequences wait and this request adds {num_seqs}, "
                f"more than the {self.max_waiting} allowed to wait; retry later"))
            return
        added: list[str] = []
        try:
            for request_id, prompt in zip(stream.request_ids, command.prompts):
                self.engine.add_request(request_id, prompt, command.params)
                added.append(request_id)
        except Exception as exc:  # ValueError: invalid input; anything else surfaces as a server error
            for request_id in added:
                self.engine.abort_request(request_id)
            self.metrics.requests_rejected.labels("invalid" if isinstance(exc, ValueError) else "error").inc()
            self._post(stream, exc)
            return
        for request_id in added:
            self._progress[request_id] = (stream, RequestProgress(command.arrival_time))
        self._post(stream, _ACCEPTED)

    def _abort(self, request_ids: tuple[str, ...]) -> None:
        for request_id in request_ids:
            if self._progress.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing its requests")
            self._fail_all(RequestAborted(f"the engine failed: {exc}"))
            return
        now = time.monotonic()
        for output in outputs:
            stream, progress = self._progress[output.request_id]
            self.metrics.observe(progress, output, now)
            if output.finished:
                del self._progress[output.request_id]
            self._post(stream, output if output.error is None else RequestFailed(
                f"the engine could not run this request: {output.error}"))
        self._flush()

    def _fail_all(self, error: Exception) -> None:
        """End every tracked request with ``error``; callers hear first, as the engine may be broken."""
        for stream, _ in self._progress.values():
            self._post(stream, error)
        self._flush()
        for request_id in self._progress:
            self.engine.abort_request(request_id)
        self._progress.clear()

    def _close(self) -> None:
        with self._lock:
            self._accepting = False
        closed = EngineClosed("the server is shutting down and takes no new requests")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                with self._lock:
                    self._pending_seqs -= command.num_seqs
                self._post(command.stream, closed)
        self._fail_all(RequestAborted("the server is shutting down and aborted the request"))

    def _post(self, stream: RequestStream, item: object) -> None:
        self._outbox[stream.loop].append((stream, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, defaultdict(list)
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody waits for these requests any more
                self._abort(tuple(i for stream, _ in items for i in stream.request_ids))
