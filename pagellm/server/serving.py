"""Completions and chat completions: HTTP bodies in, engine requests, OpenAI responses out.

A completion request with several prompts becomes one engine request per
prompt, submitted as a unit; choice ``i * n + j`` is sample ``j`` of prompt
``i``. Engine outputs are cumulative, so what each choice has been sent is
remembered and only the difference goes out in a streamed chunk.

Work that grows with the request (tokenizing, chat templating, compiling a
structured-output grammar, detokenizing) runs in a small thread pool: off the
event loop, so every other request (``/health`` included) keeps being served,
and off the engine thread, so generation never waits for it. A stream that
the server ends (shutdown) still sends its usage chunk when asked to.
"""
from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from pagellm.inputs import Prompt, TokenizedPrompt, apply_chat_template
from pagellm.outputs import Logprob, RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.server.async_engine import AsyncEngine, RequestStream
from pagellm.server.errors import APIError, to_api_error
from pagellm.server.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs,
    ChatMessage, ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DetokenizeRequest, DetokenizeResponse, SamplingRequest, TokenizeRequest, TokenizeResponse,
    TokenLogprob, TopLogprob, UsageInfo,
)

T = TypeVar("T")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_POOL_THREADS = 2


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) response was ready."""


@dataclass
class Delta:
    """What is new in one choice since it was last sent."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _Sent:
    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0   # where the next token's text starts (completion logprobs)
    finished: bool = False


class Generation:
    """One HTTP request's engine requests, and what has been sent of each choice."""

    def __init__(self, request_id: str, stream: RequestStream, n: int) -> None:
        self.id = request_id
        self.stream = stream
        self.created = int(time.time())
        self.num_choices = len(stream.request_ids) * n
        self._first_index = {rid: i * n for i, rid in enumerate(stream.request_ids)}
        self._sent = [_Sent() for _ in range(self.num_choices)]
        self._prompt_tokens: dict[str, int] = {}
        self._completion_tokens = [0] * self.num_choices

    def deltas(self, output: RequestOutput) -> list[Delta]:
        """The choices of ``output`` with something new to send, marked as sent."""
        self._prompt_tokens[output.request_id] = len(output.prompt_token_ids)
        deltas = []
        for completion in output.outputs:
            index = self._first_index[output.request_id] + completion.index
            self._completion_tokens[index] = len(completion.token_ids)
            sent = self._sent[index]
            text = completion.text[sent.text_len:]
            token_ids = completion.token_ids[sent.num_tokens:]
            logprobs = None if completion.logprobs is None else completion.logprobs[sent.num_tokens:]
            finished = completion.finish_reason is not None
            if sent.finished or not (text or finished or (logprobs and token_ids)):
                continue
            sent.text_len, sent.num_tokens, sent.finished = len(completion.text), len(completion.token_ids), finished
            deltas.append(Delta(index, text, token_ids, logprobs, completion.finish_reason, completion.stop_reason))
        return deltas

    def offset_text(self, index: int, token_texts: list[str]) -> list[int]:
        """Start offsets of the given token texts in choice ``index``'s text, advancing it."""
        sent = self._sent[index]
        offsets = []
        for text in token_texts:
            offsets.append(sent.text_offset)
            sent.text_offset += len(text)
        return offsets

    def usage(self) -> UsageInfo:
        prompt, completion = sum(self._prompt_tokens.values()), sum(self._completion_tokens)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_text(tid: int, entry: Logprob) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"token_id:{tid}"


def completion_logprobs(generation: Generation, delta: Delta) -> CompletionLogprobs | None:
    if delta.logprobs is None:
        return None
    tokens = [_token_text(t, entry[t]) for t, entry in zip(delta.token_ids, delta.logprobs)]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[entry[t].logprob for t, entry in zip(delta.token_ids, delta.logprobs)],
        top_logprobs=[{_token_text(i, lp): lp.logprob for i, lp in entry.items()} for entry in delta.logprobs],
        text_offset=generation.offset_text(delta.index, tokens))


def chat_logprobs(delta: Delta, top_n: int) -> ChatLogprobs | None:
    if delta.logprobs is None:
        return None

    def top(tid: int, lp: Logprob) -> TopLogprob:
        text = _token_text(tid, lp)
        return TopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()))

    content = []
    for tid, entry in zip(delta.token_ids, delta.logprobs):
        ranked = sorted((lp.rank, i, lp) for i, lp in entry.items() if lp.rank is not None)[:top_n]
        chosen = top(tid, entry[tid])
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[top(i, lp) for _, i, lp in ranked]))
    return ChatLogprobs(content=content)


def render_chat(tokenizer, messages: list[ChatMessage], encode: Callable[[str], list[int]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the reply."""
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in messages]
    return apply_chat_template(tokenizer, conversation, encode)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it and raising ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientDisconnected
    return task.result()


async def final_outputs(stream: RequestStream) -> list[RequestOutput]:
    last: dict[str, RequestOutput] = {}
    async for output in stream:
        last[output.request_id] = output
    return [last[i] for i in stream.request_ids]


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="pagellm-prepare")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def tokenizer(self):
        if self.engine.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return self.engine.engine.tokenizer

    async def _render_chat(self, messages: list[ChatMessage]) -> list[int]:
        try:
            encode = functools.partial(self.engine.engine.encode, add_special_tokens=False)   # bounded work
            return await self._in_pool(render_chat, self.tokenizer(), messages, encode)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    # ---- tokenize, detokenize ------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            tokens = await self._render_chat(body.messages)
        else:
            tokens = await self._in_pool(lambda: self.tokenizer().encode(
                body.prompt, add_special_tokens=body.add_special_tokens))
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.engine.max_model_len, tokens=tokens)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.tokenizer()
        vocab = self.engine.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=await self._in_pool(tokenizer.decode, body.tokens))

    # ---- completions -------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        generation = await self._start("cmpl", body, prompts, body.max_tokens, body.logprobs,
                                       {"prompt_token_ids": "prompt"})
        if body.stream:
            return self._event_stream(generation, self._completion_chunks(generation), body.include_usage,
                                      CompletionResponse)
        deltas = await self._collect(generation, request)
        choices = [self._completion_choice(generation, d) for d in deltas]
        return _json(CompletionResponse(id=generation.id, created=generation.created, model=self.model_name,
                                        choices=choices, usage=generation.usage()))

    async def _completion_chunks(self, generation: Generation) -> AsyncIterator[CompletionResponse]:
        async for output in generation.stream:
            for delta in generation.deltas(output):
                yield CompletionResponse(id=generation.id, created=generation.created, model=self.model_name,
                                         choices=[self._completion_choice(generation, delta)])

    @staticmethod
    def _completion_choice(generation: Generation, delta: Delta) -> CompletionChoice:
        return CompletionChoice(index=delta.index, text=delta.text, logprobs=completion_logprobs(generation, delta),
                                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)

    # ---- chat completions -----------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompt = await self._render_chat(body.messages)
        generation = await self._start("chatcmpl", body, [prompt], body.max_new_tokens, body.num_logprobs,
                                       {"prompt": "messages", "prompt_token_ids": "messages"})
        top_n = body.top_logprobs or 0
        if body.stream:
            return self._event_stream(generation, self._chat_chunks(generation, top_n), body.include_usage,
                                      ChatCompletionChunk)
        deltas = await self._collect(generation, request)
        choices = [ChatChoice(index=d.index, message=ChatResponseMessage(content=d.text),
                              logprobs=chat_logprobs(d, top_n), finish_reason=d.finish_reason,
                              stop_reason=d.stop_reason) for d in deltas]
        return _json(ChatCompletionResponse(id=generation.id, created=generation.created, model=self.model_name,
                                            choices=choices, usage=generation.usage()))

    async def _chat_chunks(self, generation: Generation, top_n: int) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=generation.id, created=generation.created, model=self.model_name,
                                       choices=choices)

        for index in range(generation.num_choices):
            yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        async for output in generation.stream:
            for d in generation.deltas(output):
                yield chunk([ChatStreamChoice(index=d.index, delta=ChatDelta(content=d.text),
                                              logprobs=chat_logprobs(d, top_n), finish_reason=d.finish_reason,
                                              stop_reason=d.stop_reason)])

    # ---- shared -----------------------------------------------------------------------
    async def _start(self, prefix: str, body: SamplingRequest, prompts: list[Prompt], max_tokens: int | None,
                     logprobs: int | None, aliases: Mapping[str, str]) -> Generation:
        """Validate the sampling fields, tokenize and compile in the pool, and submit;
        every refusal becomes an APIError."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        aliases = {**aliases, "structured_outputs": body.structured_field}
        try:
            params: SamplingParams = body.sampling_params(max_tokens, logprobs)
            prompts = await self._in_pool(self._prepare, prompts, params)
            stream = await self.engine.submit(request_id, prompts, params)
        except Exception as exc:
            raise to_api_error(exc, type(body).model_fields, aliases) from exc
        return Generation(request_id, stream, body.n)

    def _prepare(self, prompts: list[Prompt], params: SamplingParams) -> list[Prompt]:
        """Text prompts tokenized, and the grammar compiled into the engine's cache (runs in the pool)."""
        engine = self.engine.engine
        if params.structured_outputs is not None:
            engine.grammars.compile(params.structured_outputs)
        return [TokenizedPrompt(*engine.tokenize(p)) if isinstance(p, str) else p for p in prompts]

    async def _collect(self, generation: Generation, request: Request) -> list[Delta]:
        """Wait for every choice to finish (aborting if the client leaves) and return them whole."""
        try:
            outputs = await unless_disconnected(request, final_outputs(generation.stream))
        except ClientDisconnected as exc:
            raise APIError(499, "the client closed the request", code="client_closed_request") from exc
        except Exception as exc:
            raise to_api_error(exc) from exc
        finally:
            self.engine.abort(*generation.stream.unfinished_ids)
        deltas = [d for output in outputs for d in generation.deltas(output)]
        return sorted(deltas, key=lambda d: d.index)

    def _event_stream(self, generation: Generation, chunks: AsyncIterator[BaseModel], include_usage: bool,
                      chunk_type: type[CompletionResponse | ChatCompletionChunk]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except Exception as exc:  # the status line is out: report in-band, as OpenAI does
                yield f"data: {to_api_error(exc).body().model_dump_json()}\n\n"
            finally:  # also on disconnect (cancellation) and when the response is dropped
                self.engine.abort(*generation.stream.unfinished_ids)
            if include_usage:   # what was generated, also when the server ended the stream
                usage = chunk_type(id=generation.id, created=generation.created, model=self.model_name,
                                   choices=[], usage=generation.usage())
                yield f"data: {usage.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


def _json(body: BaseModel) -> JSONResponse:
    return JSONResponse(body.model_dump())
