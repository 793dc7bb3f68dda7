"""The OpenAI-compatible serving API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Protocol

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from rempd.api import openai_schema as schema
from rempd.api.api_key import RequireApiKey
from rempd.api.body_limit import DEFAULT_MAX_REQUEST_BYTES, LimitBody
from rempd.api.errors import APIError, bad_request, documented, error_body, install_error_handlers, unavailable
from rempd.api.event_stream import EventStream, sse
from rempd.api.gate import Gate, Ticket
from rempd.api.metrics import CONTENT_TYPE, Metrics, RequestTimer
from rempd.engine.outputs import RequestOutput
from rempd.engine.sampling_params import SamplingParams

ChunkFn = Callable[[str, int, str, str, "str | None", bool], dict]


class ServingEngine(Protocol):
    """The part of AsyncEngine this API uses."""
    tokenizer: Any
    max_model_len: int
    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncGenerator[RequestOutput, None]: ...
    def stats(self) -> Any: ...
    def status(self) -> dict: ...
    @property
    def is_healthy(self) -> bool: ...


def create_serving_app(engine: ServingEngine, *, model_name: str, model_root: str, gate: Gate, metrics: Metrics,
                       api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="rempd serving API", version="1", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    app.add_middleware(LimitBody, max_bytes=max_request_bytes)  # added last: runs first, even before the key
    api = ServingAPI(engine, model_name, model_root, gate, metrics)
    errors = documented(400, 401, 404, 413, 503)
    app.post("/v1/completions", response_model=schema.CompletionResponse,
             responses={**errors, 200: _streamed("text_completion")})(api.completions)
    app.post("/v1/chat/completions", response_model=schema.ChatCompletionResponse,
             responses={**errors, 200: _streamed("chat.completion.chunk")})(api.chat_completions)
    app.get("/v1/models", response_model=schema.ModelList, responses=documented(401))(api.models)
    app.get("/v1/models/{model_id:path}", response_model=schema.ModelCard,
            responses=documented(401, 404))(api.model)
    app.get("/health", response_model=schema.Health, responses=documented(503))(api.health)
    app.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})(api.prometheus)
    return app


def _streamed(chunk_object: str) -> dict:
    return {"content": {"text/event-stream": {"schema": schema.sse_event_schema(chunk_object)}},
            "description": "JSON, or with stream=true server-sent events"}


class ServingAPI:
    def __init__(self, engine: ServingEngine, model_name: str, model_root: str, gate: Gate, metrics: Metrics):
        self.engine, self.model_name, self.model_root = engine, model_name, model_root
        self.gate, self.metrics = gate, metrics
        self.created = int(time.time())

    async def completions(self, body: schema.CompletionRequest) -> Any:
        self.check_model(body.model)
        prompt_ids = self.completion_prompt(body.prompt)
        return await self.generate(body, prompt_ids, body.max_tokens, "cmpl", "text_completion",
                                   schema.completion_body, schema.completion_chunk, "prompt")

    async def chat_completions(self, body: schema.ChatCompletionRequest) -> Any:
        self.check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # the template is user-facing Jinja: any failure is the request's
            raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from None
        prompt_ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return await self.generate(body, prompt_ids, body.max_new_tokens, "chatcmpl", "chat.completion.chunk",
                                   schema.chat_body, schema.chat_chunk, "messages")

    async def models(self) -> dict:
        return {"object": "list", "data": [self.card()]}

    async def model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self.card()

    async def health(self) -> dict:
        if self.gate.draining:
            raise unavailable("rempd is shutting down")
        if not self.engine.is_healthy:
            raise unavailable("a worker is dead or restarting")
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(self.engine), media_type=CONTENT_TYPE)

    def card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "remp",
                "root": self.model_root, "max_model_len": self.engine.max_model_len}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # the schema allows exactly one
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        vocab = getattr(self.engine.tokenizer, "vocab_size", None)
        if vocab is not None and max(prompt) >= vocab:
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_token_id")
        return list(prompt)

    def sampling(self, body: schema.SamplingRequest, prompt_len: int, max_tokens: int | None,
                 param: str) -> SamplingParams:
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param=param)
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < 1:
            raise bad_request(f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens} "
                              f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion)",
                              param=param, code="context_length_exceeded")
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=0 if body.top_k in (None, -1) else body.top_k,
                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, max_tokens=max_tokens,
                stop=body.stop_list, stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=bool(body.ignore_eos))
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    async def generate(self, body: schema.SamplingRequest, prompt_ids: list[int], max_tokens: int | None,
                       prefix: str, chunk_object: str, body_fn: Callable[..., dict], chunk_fn: ChunkFn,
                       param: str) -> Any:
        params = self.sampling(body, len(prompt_ids), max_tokens, param)
        ticket = self.gate.admit()
        clock = RequestTimer(self.metrics)
        request_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        outputs = self.engine.generate(request_id, prompt_ids, params)
        streaming = False

        async def release() -> None:
            await outputs.aclose()  # aborts the request in the engine if it is still running
            self.gate.release(ticket)

        try:
            async with ticket.guard():
                first = await self.first_output(outputs, param)
                self.check_output(first)  # a failure before any token can still be an HTTP status
                if body.stream:
                    streaming = True
                    events = self.events(request_id, created, first, outputs, ticket, clock, chunk_fn,
                                         chunk_object, body.include_usage)
                    return EventStream(events, release)
                out, text = first, []
                while True:
                    clock.tick(out)
                    self.check_output(out)
                    text.append(out.new_text)
                    if out.finished:
                        break
                    out = await anext(outputs)
        except TimeoutError:
            raise unavailable("rempd is shutting down and stopped this request at its drain timeout") from None
        finally:
            if not streaming:
                await release()
        clock.finish(out)
        return body_fn(request_id, created, self.model_name, "".join(text), out.finish_reason,
                       out.prompt_tokens, out.completion_tokens)

    async def first_output(self, outputs: AsyncIterator[RequestOutput], param: str) -> RequestOutput:
        try:
            return await anext(outputs)
        except ValueError as exc:  # the engine refuses what it cannot take
            raise bad_request(str(exc), param=param) from None
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without an answer") from None

    @staticmethod
    def check_output(out: RequestOutput) -> None:
        if out.finished and out.finish_reason not in ("stop", "length"):
            raise unavailable(f"the engine could not finish this request ({out.finish_reason}): "
                              f"{out.error or 'aborted'}; retry it")

    async def events(self, request_id: str, created: int, out: RequestOutput, outputs: AsyncIterator[RequestOutput],
                     ticket: Ticket, clock: RequestTimer, chunk_fn: ChunkFn, chunk_object: str,
                     include_usage: bool) -> AsyncIterator[bytes]:
        # After the 200 is sent a failure can only be an error event; no [DONE] follows one, so clients
        # cannot take a cut-short stream for a complete answer.
        first = True
        try:
            async with ticket.guard():
                while True:
                    clock.tick(out)
                    try:
                        self.check_output(out)
                    except APIError as exc:
                        yield sse(error_body(exc.message, exc.type, code=exc.code))
                        return
                    reason = out.finish_reason if out.finished else None
                    if out.new_text or reason:
                        chunk = chunk_fn(request_id, created, self.model_name, out.new_text, reason, first)
                        if include_usage:
                            chunk["usage"] = None
                        first = False
                        yield sse(chunk)
                    if out.finished:
                        break
                    out = await anext(outputs)
        except TimeoutError:
            yield sse(error_body("rempd is shutting down and stopped this request at its drain timeout",
                                 "service_unavailable", code="service_unavailable"))
            return
        clock.finish(out)
        if include_usage:
            yield sse(schema.usage_chunk(request_id, created, self.model_name, chunk_object,
                                         out.prompt_tokens, out.completion_tokens))
        yield b"data: [DONE]\n\n"

