"""The serving API's error paths, against a stand-in engine: every refusal is a 4xx/5xx in OpenAI's error body.

The happy paths run against the real engine in the end-to-end tests; the stand-in here only refuses,
fails or hangs.
"""
import asyncio
import json

import httpx
import pytest

from rempd.api.gate import Gate
from rempd.api.metrics import Metrics
from rempd.api.serving import create_serving_app
from rempd.engine.outputs import EngineStats, RequestOutput

MODEL = "tiny"
MAX_LEN = 32


class Tokenizer:
    vocab_size = 100
    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise ValueError("roles must be system, user or assistant")
        return "".join(m["content"] for m in messages)


class StandInEngine:
    """Refuses (ValueError), fails (an error output, at once or after a token) or hangs after a token until
    aborted: the engine's unhappy behaviours."""
    tokenizer = Tokenizer()
    max_model_len = MAX_LEN

    def __init__(self, mode="refuse"):
        self.mode = mode
        self.is_healthy = True
        self.started = asyncio.Event()
        self.closed = 0

    async def generate(self, request_id, prompt_token_ids, params):
        try:
            if self.mode == "refuse":
                raise ValueError("the stand-in engine refuses every request")
            if self.mode in ("fail_midway", "hang"):
                yield RequestOutput(request_id, [7], "a", False, None, len(prompt_token_ids), 1)
            if self.mode in ("fail", "fail_midway"):
                yield RequestOutput(request_id, [], "", True, "error", len(prompt_token_ids), 1, "worker 0 died")
            self.started.set()
            await asyncio.Event().wait()  # "hang": one token, then a request that never finishes by itself
        finally:
            self.closed += 1

    def stats(self):
        return EngineStats(num_running=2, num_waiting=1, kv_blocks_used=5, kv_blocks_total=20, num_preempted=0)

    def status(self):
        return {"topology": {"tp": 2, "pp": 1}}


def make_app(engine=None, api_key=None, gate=None):
    engine = engine or StandInEngine()
    gate = gate or Gate()
    return create_serving_app(engine, model_name=MODEL, model_root="/models/tiny", gate=gate,
                              metrics=Metrics(MODEL), api_key=api_key)


def call(app, method, path, **kwargs):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


JSON = {"content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("content", [b"{not json", b'{"prompt": "x",}', b""])
def test_malformed_json_is_400(path, content):
    error = error_of(call(make_app(), "POST", path, content=content, headers=JSON), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"prompt"', b"null"])
def test_a_body_that_is_not_an_object_is_400(content):
    error = error_of(call(make_app(), "POST", "/v1/completions", content=content, headers=JSON), 400)
    assert "JSON object" in error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": [1, 500]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # template refuses
])
def test_invalid_requests_are_400_naming_the_field(path, body, param):
    error = error_of(call(make_app(), "POST", path, json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error


def test_n_other_than_one_says_why():
    error = error_of(call(make_app(), "POST", "/v1/completions", json={"prompt": "x", "n": 3}), 400)
    assert error["message"] == "n: only n=1 is supported: send one request per completion"


def test_nan_is_refused():
    content = b'{"prompt": "x", "temperature": NaN}'
    error_of(call(make_app(), "POST", "/v1/completions", content=content, headers=JSON), 400)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x" * MAX_LEN}),  # the prompt alone fills the context
    ("/v1/completions", {"prompt": "x" * 10, "max_tokens": MAX_LEN}),  # prompt + completion do not fit
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]}),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 40, "max_tokens": 50}),
])
def test_over_the_context_is_400(path, body):
    error = error_of(call(make_app(), "POST", path, json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_LEN} tokens" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_what_the_engine_refuses_is_400_and_unknown_fields_are_ignored(stream):
    body = {"prompt": "x", "min_tokens": 3, "repetition_penalty": 1.0, "logprobs": None, "stop": None,
            "ignore_eos": True, "stream": stream, "stream_options": {"continuous_usage_stats": True}}
    error = error_of(call(make_app(), "POST", "/v1/completions", json=body), 400)
    assert error["message"] == "the stand-in engine refuses every request"  # it got past validation


@pytest.mark.parametrize("path, body", [("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
                                        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"})])
def test_unknown_model_is_404(path, body):
    error = error_of(call(make_app(), "POST", path, json=body), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    error_of(call(make_app(), "GET", "/v1/models/gpt-4"), 404)


def test_unknown_route_and_method_use_the_error_body():
    error_of(call(make_app(), "GET", "/v2/nothing"), 404)
    response = call(make_app(), "DELETE", "/v1/models")
    error_of(response, 405)
    assert response.headers["allow"] == "GET"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}])
def test_missing_or_wrong_api_key_is_401(headers):
    app = make_app(api_key="sekrit")
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
        # malformed body on purpose: the key is checked before the body is parsed
        error = error_of(call(app, method, path, content=b"{", headers={**headers, **JSON}), 401)
        assert error["code"] == "invalid_api_key"
    assert call(app, "GET", "/health").status_code == 200  # probes need no key
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200


def test_draining_refuses_new_requests_with_503_and_health_follows():
    gate = Gate()
    gate.draining = True
    app = make_app(gate=gate)
    response = call(app, "POST", "/v1/completions", json={"prompt": "x"})
    error = error_of(response, 503)
    assert error["type"] == "service_unavailable" and response.headers["retry-after"]
    error_of(call(app, "GET", "/health"), 503)


def test_health_is_503_while_the_engine_is_unhealthy():
    engine = StandInEngine()
    engine.is_healthy = False
    assert "worker" in error_of(call(make_app(engine), "GET", "/health"), 503)["message"]


def test_engine_failure_before_the_first_token_is_503_and_the_request_is_released():
    engine, gate = StandInEngine("fail"), Gate()
    for stream in (False, True):
        body = {"prompt": "x", "stream": stream}
        assert "worker 0 died" in error_of(call(make_app(engine, gate=gate), "POST", "/v1/completions",
                                                json=body), 503)["message"]
    assert gate.active == 0 and engine.closed == 2


def sse_events(text):
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.split("\n\n") if line.startswith("data: ")]


def test_engine_failure_mid_stream_ends_with_an_error_event_and_no_done():
    engine, gate = StandInEngine("fail_midway"), Gate()
    response = call(make_app(engine, gate=gate), "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert events[-1]["error"]["type"] == "service_unavailable" and "worker 0 died" in events[-1]["error"]["message"]
    assert "[DONE]" not in events
    assert gate.active == 0 and engine.closed == 1


@pytest.mark.parametrize("stream", [False, True])
def test_drain_timeout_aborts_running_requests_with_an_error(stream):
    async def go():
        engine, gate = StandInEngine("hang"), Gate()
        app = make_app(engine, gate=gate)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "stream": stream}))
            await asyncio.wait_for(engine.started.wait(), 5)
            assert await gate.drain(0.05) == 1  # still running at the deadline
            assert await gate.abort_all() == 0
            return await request, engine
    response, engine = asyncio.run(go())
    assert engine.closed == 1  # the engine was told to abort
    if stream:
        assert sse_events(response.text)[-1]["error"]["code"] == "service_unavailable"
    else:
        assert "drain timeout" in error_of(response, 503)["message"]
