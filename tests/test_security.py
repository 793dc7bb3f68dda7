"""Security limits of the serving API (stand-in engine): body size, prompt and max_tokens bounds, JSON only,
and an API key that never reaches the logs. The control socket's mode and SO_PEERCRED check are in
test_unix_socket.py; a real daemon's log is checked for its key in test_daemon_e2e.py."""
import ast
import logging
from pathlib import Path

import pytest

from rempd.api.gate import Gate
from rempd.api.metrics import Metrics
from rempd.api.serving import create_serving_app
from rempd.config import DaemonConfig
from test_serving_api import JSON, MAX_LEN, MODEL, StandInEngine, call, error_of

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-remp-7d1f0c9a5b"


def limited_app(max_bytes: int = 4096, api_key: str | None = None):
    return create_serving_app(StandInEngine(), model_name=MODEL, model_root="/m", gate=Gate(), metrics=Metrics(MODEL),
                              api_key=api_key, max_request_bytes=max_bytes)


def test_a_body_over_the_limit_is_413_with_the_limit_named():
    big = b'{"prompt": "' + b"x" * 5000 + b'"}'
    error = error_of(call(limited_app(), "POST", "/v1/completions", content=big, headers=JSON), 413)
    assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]


def test_a_chunked_body_is_counted_as_it_arrives():
    async def chunks():  # no Content-Length: the limit must hold on the bytes themselves
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'
    error = error_of(call(limited_app(), "POST", "/v1/completions", content=chunks(), headers=JSON), 413)
    assert error["code"] == "request_too_large"


def test_a_body_under_the_limit_reaches_the_engine():
    error = error_of(call(limited_app(), "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1, "padding": "y" * 3000}), 400)
    assert error["message"] == "the stand-in engine refuses every request"


@pytest.mark.parametrize("body, code", [
    ({"prompt": "x" * (MAX_LEN + 5)}, "context_length_exceeded"),  # prompt tokens past the context
    ({"prompt": "x", "max_tokens": 2 ** 62}, "context_length_exceeded"),  # max_tokens past the context
    ({"prompt": [5, 2 ** 40]}, "invalid_token_id"),
    ({"prompt": "x", "max_tokens": 0}, None),
])
def test_prompt_tokens_and_max_tokens_are_bounded_with_a_reason(body, code):
    error = error_of(call(limited_app(max_bytes=1 << 20), "POST", "/v1/completions", json=body), 400)
    assert error["message"] and (code is None or error["code"] == code), error


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/x-python-pickle",
                                          "application/x-www-form-urlencoded", "text/plain"])
def test_only_json_is_read(content_type):
    import pickle

    body = pickle.dumps({"prompt": "x"})
    error = error_of(call(limited_app(), "POST", "/v1/completions", content=body,
                          headers={"content-type": content_type}), 400)
    assert "JSON" in error["message"]


def test_no_code_that_meets_client_data_can_unpickle_or_eval():
    """The APIs, the daemon and rempctl read clients' bytes only through json (the worker pool's pickled RPC is
    between the daemon and its own workers, on an authenticated private socket)."""
    banned_modules = {"pickle", "marshal", "shelve", "dill", "yaml", "cloudpickle"}
    files = [*(ROOT / "rempd" / "api").glob("*.py"), *(ROOT / "rempctl").glob("*.py"),
             *(ROOT / "rempd" / name for name in ("daemon.py", "protocol.py", "config.py", "config_values.py"))]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {n.split(".")[0] for n in names} & banned_modules, f"{path}: imports {names}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}:{node.lineno}: {node.func.id}()"


def test_the_api_key_never_reaches_the_logs_or_the_config_repr(caplog):
    caplog.set_level(logging.DEBUG)
    app = limited_app(api_key=KEY)
    for headers in [{"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}"}]:
        call(app, "POST", "/v1/completions", json={"prompt": "x"}, headers=headers)
        call(app, "POST", "/v1/completions", content=b"{", headers={**headers, **JSON})
    assert KEY not in caplog.text
    config = DaemonConfig.from_sources(flags={"model": "/m", "cpu_workers": 1, "api_key": KEY})
    assert KEY not in repr(config) and KEY not in str(config)
