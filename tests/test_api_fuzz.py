"""Schemathesis over both APIs' OpenAPI schemas, in process: no 5xx, and every answer fits the schema.

The serving API runs on a stand-in engine that answers every request with one token (tests/test_daemon_e2e.py
sends bad input to the real engine). Of the control API only /v1/status is fuzzed here.
"""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rempd.api.control import Lifecycle, create_control_app
from rempd.api.gate import Gate
from rempd.api.metrics import Metrics
from rempd.api.serving import create_serving_app
from rempd.engine.outputs import EngineStats, RequestOutput

# REMP_FUZZ_EXAMPLES=300 for a deeper run; the default keeps the suite fast
FUZZ = settings(max_examples=int(os.environ.get("REMP_FUZZ_EXAMPLES", 25)), deadline=None,
                suppress_health_check=list(HealthCheck))


class Tokenizer:
    vocab_size = 100

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<s>" + "".join(m["content"] for m in messages)


class StandInEngine:
    tokenizer = Tokenizer()
    max_model_len = 4096
    is_healthy = True
    model_name = "tiny"

    async def generate(self, request_id, prompt_token_ids, params):
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError("prompt too long")
        yield RequestOutput(request_id, [7], "a", True, "length", len(prompt_token_ids), 1)

    def stats(self):
        return EngineStats(num_running=1, num_waiting=0, kv_blocks_used=3, kv_blocks_total=64, num_preempted=0)

    def status(self):
        workers = [{"index": 0, "device": "cpu", "pid": os.getpid(), "state": "active", "pp_rank": 0, "tp_rank": 0,
                    "weight_bytes": 1 << 20, "kv_blocks": 64},
                   {"index": 1, "device": "cpu", "pid": None, "state": "standby", "pp_rank": None, "tp_rank": None,
                    "weight_bytes": 0, "kv_blocks": 0}]
        return {"topology": {"tp": 1, "pp": 1}, "placement": [0], "workers": workers, "num_recoveries": 0}


serving_app = create_serving_app(StandInEngine(), model_name="tiny", model_root="/models/tiny", gate=Gate(),
                                 metrics=Metrics("tiny"))
serving = schemathesis.openapi.from_asgi("/openapi.json", serving_app)

control_app = create_control_app(Lifecycle(state="serving", engine=StandInEngine(), model_name="tiny"))
# plan and switch need a real engine: tests/test_switch_live.py and tests/test_rempctl_switch.py call them
control = schemathesis.openapi.from_asgi("/openapi.json", control_app).include(path="/v1/status")


def valid_requests_are_accepted(ctx, response, case):
    """positive_data_acceptance, less the refusals no static schema can state: prompt plus max_tokens over
    the context, token ids past the vocabulary, and model ids other than the one served."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if case.operation.path == "/v1/models/{model_id}" and response.status_code == 404:
        return None
    if response.status_code in (400, 404):
        code = response.json()["error"]["code"]
        if code in ("context_length_exceeded", "invalid_token_id", "model_not_found"):
            return None
    raise AssertionError(f"a schema-valid request was refused: {response.status_code} {response.text}")


@serving.parametrize()
@FUZZ
def test_serving_api(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance],
                           additional_checks=[valid_requests_are_accepted])


@control.parametrize()
@FUZZ
def test_control_api(case):
    case.call_and_validate()


SLOW_FUZZ = settings(FUZZ, max_examples=max(FUZZ.max_examples, 75))


@pytest.mark.slow
@serving.parametrize()
@SLOW_FUZZ
def test_serving_api_deeper(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance],
                           additional_checks=[valid_requests_are_accepted])


@pytest.mark.slow
@control.parametrize()
@SLOW_FUZZ
def test_control_api_deeper(case):
    case.call_and_validate()
