"""OpenAI request and response shapes, as far as ReMP serves them.

Requests ignore fields they do not know: the load generators send vLLM extensions
(min_tokens, repetition_penalty, continuous_usage_stats, ...) and `extra="forbid"` would break them.
Response models exist for the OpenAPI schema; the handlers build the same shapes as plain dicts,
and the streaming chunks by hand, since they are on the per-token path.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _json_int(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer, and so do some clients; strict mode alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The bounds come before the validator so that they reach the JSON schema as minimum, not as a bare "ge".
Int = Annotated[int, BeforeValidator(_json_int)]
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_json_int)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_int)]
TopK = Annotated[int, Field(ge=-1), BeforeValidator(_json_int)]
FinishReason = Literal["stop", "length"]
TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]
# One prompt per request: the batched forms of the OpenAI API must hold exactly one.
Prompt = (str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=1)]
          | Annotated[list[TokenIds], Field(min_length=1, max_length=1)])


class OpenAIRequest(BaseModel):
    # strict: a JSON API has no reason to read "1" as 1 or false as 0, and the schema says so
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class SamplingRequest(OpenAIRequest):
    """The fields /v1/completions and /v1/chat/completions share."""
    model: str | None = Field(None, description="the served model id; the only one if omitted")
    temperature: float | None = Field(None, ge=0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = Field(None, description="0 or -1: the whole vocabulary")
    seed: Int | None = Field(None, description="any integer; sampling is reproducible per seed")
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool | None = False
    n: Int | None = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported: send one request per completion")
        return n

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Prompt = Field(description="text or token ids; a list of them must hold exactly one prompt")
    max_tokens: PositiveInt | None = Field(16, description="null: up to the end of the context")


class ContentPart(OpenAIRequest):
    type: Literal["text"] = Field(description="only text parts: the models served are text-only")
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(None, description="deprecated by OpenAI; the smaller of the two wins")
    max_completion_tokens: PositiveInt | None = None

    @property
    def max_new_tokens(self) -> int | None:
        given = [m for m in (self.max_tokens, self.max_completion_tokens) if m is not None]
        return min(given) if given else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str  # vLLM's extension; `vllm bench` reads it
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


def sse_event_schema(chunk_object: str) -> dict:
    """OpenAPI for one server-sent event of a streamed answer: a chunk, an error event, or the final [DONE]."""
    chunk = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
             "properties": {"object": {"const": chunk_object}, "choices": {"type": "array", "maxItems": 1},
                            "usage": {"anyOf": [{"type": "null"}, Usage.model_json_schema()]}}}
    error = {"type": "object", "required": ["error"],
             "properties": {"error": {"type": "object", "required": ["message", "type"]}}}
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, created: int, model: str, text: str, finish_reason: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(request_id: str, created: int, model: str, text: str, finish_reason: str | None,
              prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None,
                     first: bool) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None,
               first: bool) -> dict:
    # The role rides on the first chunk that carries a token: TTFT is measured from it.
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, created: int, model: str, object: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last chunk under stream_options.include_usage: the totals, and `choices` always empty."""
    return {"id": request_id, "object": object, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
