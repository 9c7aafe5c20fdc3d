"""The OpenAI-compatible HTTP server (`pagellm serve`).

async_engine: one thread stepping the LLMEngine, asyncio callers; protocol:
request/response bodies; serving: completions and chat; app: routes; guard: API
key and body size, before the body is read;
errors: the OpenAI error shape; metrics: Prometheus; launcher: uvicorn with a
graceful drain; commands: the CLI.
"""
