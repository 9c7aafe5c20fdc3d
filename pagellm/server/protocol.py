"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Field names follow OpenAI's API; a few vLLM extras (``top_k``, ``min_p``,
``ignore_eos``, ``guided_choice``, ...) are accepted too, as the ``openai``
client sends them via ``extra_body``. Requests are validated strictly, so a
mistake is a 400 naming the field rather than a guess:

- no coercion: ``true`` is not an integer, ``"yes"`` not a boolean;
- every integer fits in int64 and every float is finite;
- text must be valid Unicode (a lone surrogate such as ``"\\ud800"`` is refused);
- a field this server does not know is refused, as OpenAI's API does, and so
  is a known one it does not implement (``tools``, ``best_of``, ``echo``, ...)
  unless set to its neutral value.

Ranges are checked here so that errors name the field; SamplingParams checks
them again for direct engine users.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pagellm.inputs import Prompt, as_prompt_list
from pagellm.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, StructuredOutputsParams

MAX_N = 128            # samples per prompt
MAX_LOGPROBS = 20      # top alternatives per token, as OpenAI's chat API allows


def unsupported(*neutral: Any) -> Any:
    """A field this server does not implement: only absent, null or one of ``neutral`` is accepted."""
    def reject(value: Any) -> Any:
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            raise ValueError("is not supported by this server")
        return value

    return Annotated[Any, AfterValidator(reject)]


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid text: a lone surrogate at position {exc.start}") from exc
    return value


Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Text = Annotated[str, AfterValidator(_valid_text)]
TokenIds = list[Int64]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---- errors ---------------------------------------------------------------------

class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- requests -------------------------------------------------------------------

class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: unsupported(False) = None


class JsonSchemaFormat(RequestModel):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema must be given exactly when type is 'json_schema'")
        return self


# The ways to ask for structured outputs: at most one per request.
_STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Int64 | None = None
    stop: Text | list[Text] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: int = Field(-1, ge=-1, le=INT64_MAX)   # above the vocabulary: all tokens
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    # known, not implemented
    logit_bias: unsupported({}) = None
    best_of: unsupported(1) = None
    use_beam_search: unsupported(False) = None
    length_penalty: unsupported(1.0) = None
    prompt_logprobs: unsupported() = None
    truncate_prompt_tokens: unsupported() = None
    allowed_token_ids: unsupported() = None
    bad_words: unsupported([]) = None
    guided_grammar: unsupported() = None
    guided_decoding_backend: unsupported() = None
    guided_whitespace_pattern: unsupported() = None
    structural_tag: unsupported() = None
    logits_processors: unsupported() = None
    priority: unsupported(0) = None
    store: unsupported(False) = None
    metadata: unsupported({}) = None
    service_tier: unsupported("auto", "default") = None

    @model_validator(mode="after")
    def _one_structured_output(self) -> SamplingRequest:
        given = self._structured_fields()
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(_STRUCTURED_FIELDS)}; got {', '.join(given)}")
        return self

    def _structured_fields(self) -> list[str]:
        return [name for name in _STRUCTURED_FIELDS if getattr(self, name) is not None
                and not (name == "response_format" and self.response_format.type == "text")]

    @property
    def structured_field(self) -> str | None:
        """The field that asks for structured outputs, if any."""
        return next(iter(self._structured_fields()), None)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            return StructuredOutputsParams(json=fmt.json_schema.schema_)
        if fmt is not None and fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.guided_json is not None:
            return StructuredOutputsParams(json=self.guided_json)
        if self.guided_regex is not None:
            return StructuredOutputsParams(regex=self.guided_regex)
        if self.guided_choice is not None:
            return StructuredOutputsParams(choice=self.guided_choice)
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the field when SamplingParams rejects a value."""
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k if self.top_k else -1,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
            structured_outputs=self.structured_outputs())


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: unsupported(False) = None
    suffix: unsupported() = None

    def prompts(self) -> list[Prompt]:
        """The prompt field as a list of prompts (text or token ids)."""
        return as_prompt_list(self.prompt)


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    # what the openai client sends back with an assistant turn
    refusal: unsupported() = None
    tool_calls: unsupported([]) = None
    tool_call_id: unsupported() = None
    function_call: unsupported() = None
    audio: unsupported() = None
    annotations: unsupported([]) = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: unsupported([]) = None
    tool_choice: unsupported("none", "auto") = None
    functions: unsupported([]) = None
    function_call: unsupported("none", "auto") = None
    parallel_tool_calls: unsupported(True, False) = None
    modalities: unsupported(["text"]) = None
    audio: unsupported() = None
    prediction: unsupported() = None
    reasoning_effort: unsupported() = None
    web_search_options: unsupported() = None
    echo: unsupported(False) = None
    add_generation_prompt: unsupported(True) = None
    continue_final_message: unsupported(False) = None
    chat_template: unsupported() = None
    chat_template_kwargs: unsupported({}) = None
    documents: unsupported() = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(RequestModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: TokenIds


# ---- responses ------------------------------------------------------------------

def _now() -> int:
    return int(time.time())


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(OpenAIModel):
    content: list[TokenLogprob]


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pagellm"
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: TokenIds


class DetokenizeResponse(OpenAIModel):
    prompt: str
