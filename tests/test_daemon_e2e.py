"""A real `rempd serve` (tiny-llama, 4 CPU workers at TP2 PP2) from the outside: the official openai client,
bad input, a worker killed with -9, a SIGTERM drain, and the weight store left behind by a daemon killed with -9.

One daemon serves the API tests of this module; every test that kills or stops a daemon starts its own.
"""
import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

import fault_tools
from conftest import RunningDaemon
from fault_tools import gone, health, status, stream_in_background, wait_for

KEY = "secret"
TP2PP2 = {"tp": 2, "pp": 2}


@pytest.fixture(scope="module")
def daemon(checkpoints, tmp_path_factory):
    # Started with an API key so that the wrong-key case needs no daemon of its own.
    running = RunningDaemon(checkpoints["tiny-llama"], tmp_path_factory.mktemp("e2e"), **TP2PP2,
                            extra=["--api-key", KEY])
    yield running
    running.stop()


def client(daemon: RunningDaemon, key: str = KEY) -> OpenAI:
    return fault_tools.client(daemon, key)


def greedy(daemon: RunningDaemon, prompt: str, max_tokens: int, key: str = KEY) -> str:
    return fault_tools.greedy(daemon, prompt, max_tokens, key)


def worker_pids(daemon: RunningDaemon) -> list[int]:
    return [w["pid"] for w in status(daemon)["workers"]]


# --- 1. the official openai client -----------------------------------------------------------------------

def test_completion_reports_usage_and_length(daemon):
    out = client(daemon).completions.create(model=daemon.model_name, prompt="Once upon a time", max_tokens=7,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_streamed_completion_matches_the_plain_one_and_reports_usage(daemon):
    plain = greedy(daemon, "Once upon a time", 9)
    stream = client(daemon).completions.create(model=daemon.model_name, prompt="Once upon a time", max_tokens=9,
                                               temperature=0, stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
    events = list(stream)
    text = "".join(e.choices[0].text for e in events if e.choices)
    reasons = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert text == plain and reasons == ["length"]
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 9  # usage comes last, on its own
    assert all(e.usage is None for e in events[:-1])


def test_chat_completion_plain_and_streamed(daemon):
    messages = [{"role": "user", "content": "Say something."}]
    plain = client(daemon).chat.completions.create(model=daemon.model_name, messages=messages, max_tokens=8,
                                                   temperature=0, extra_body={"ignore_eos": True})
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 8 and plain.usage.prompt_tokens > 0
    events = list(client(daemon).chat.completions.create(
        model=daemon.model_name, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == plain.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 8 and events[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_streaming_without_include_usage_sends_no_usage(daemon):
    events = list(client(daemon).completions.create(model=daemon.model_name, prompt="Hi", max_tokens=4,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert events and all(e.usage is None for e in events)


def test_32_concurrent_streams_match_the_same_requests_sent_alone(daemon):
    prompts = [f"Client {i} asks about {'cats dogs birds fish'.split()[i % 4]} number {i * 7}" for i in range(32)]
    max_tokens = 12
    alone = [greedy(daemon, p, max_tokens) for p in prompts]

    async def together() -> list[str]:
        aclient = AsyncOpenAI(base_url=f"{daemon.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model=daemon.model_name, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([event.choices[0].text async for event in stream if event.choices])
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)

    assert asyncio.run(together()) == alone


# --- 2. bad input: a 4xx with an OpenAI error body, and the daemon goes on serving --------------------------

def post_raw(daemon, path: str, content: bytes, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{daemon.base_url}{path}", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@pytest.mark.parametrize("case", ["malformed-json", "unknown-model", "prompt-over-context", "max-tokens-0",
                                  "wrong-api-key"])
def test_bad_input_gets_a_4xx_error_body_and_serving_goes_on(daemon, case):
    if case == "malformed-json":
        response = post_raw(daemon, "/v1/completions", b'{"model": "tiny-llama", "prompt": "Hi",')
        status_code, body = response.status_code, response.json()
        expected = 400
    else:
        kwargs = {"model": daemon.model_name, "prompt": "Hi", "max_tokens": 4}
        key, expected = KEY, 400
        if case == "unknown-model":
            kwargs["model"], expected = "no-such-model", 404
        elif case == "prompt-over-context":
            max_len = client(daemon).models.retrieve(daemon.model_name).model_extra["max_model_len"]
            kwargs["prompt"] = [1] * (max_len + 1)
        elif case == "max-tokens-0":
            kwargs["max_tokens"] = 0
        elif case == "wrong-api-key":
            key, expected = "not-the-secret", 401
        with pytest.raises(openai.APIStatusError) as caught:
            client(daemon, key).completions.create(**kwargs)
        status_code, body = caught.value.status_code, caught.value.response.json()
    assert status_code == expected
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert greedy(daemon, "After a bad request", 3)  # the next request is served normally


# --- 3. a worker killed with -9 -----------------------------------------------------------------------------

def test_a_killed_worker_is_replaced_from_the_weight_store(checkpoints, start_daemon, tmp_path):
    # The daemon loads a copy, and the copy is moved away before the kill: recovery can only use /dev/shm.
    model = tmp_path / "tiny-llama"
    shutil.copytree(checkpoints["tiny-llama"], model)
    daemon = start_daemon(model, **TP2PP2)
    model.rename(tmp_path / "moved-away")
    old = worker_pids(daemon)

    streaming = stream_in_background(daemon, max_tokens=400)
    wait_for(lambda: len(streaming["chunks"]) >= 3 or not streaming["thread"].is_alive(), 60, "first chunks")
    os.kill(old[1], signal.SIGKILL)

    streaming["thread"].join(60)
    assert not streaming["thread"].is_alive(), "a stream running through the kill hung"
    # nothing lost: the request recomputed its KV on the respawned workers and went on where it was
    assert streaming["error"] is None and streaming["finish_reason"] == "length", streaming["error"]

    wait_for(lambda: health(daemon) == 200, 60, "/health 200 again")
    after = status(daemon)
    assert after["num_recoveries"] == 1
    assert all(w["state"] == "active" for w in after["workers"])
    assert not set(old) & {w["pid"] for w in after["workers"]}
    assert gone(old[1])
    assert "".join(streaming["chunks"]) == greedy(daemon, "A long story:", 400, key="none")
    assert greedy(daemon, "After the recovery", 5, key="none")

    # Killed while idle: no engine step runs into the dead worker, and /health must still come back.
    replaced = worker_pids(daemon)
    os.kill(replaced[2], signal.SIGKILL)
    wait_for(lambda: health(daemon) == 200 and status(daemon)["num_recoveries"] == 2, 60, "recovery while idle")
    assert not set(replaced) & set(worker_pids(daemon))
    assert greedy(daemon, "After an idle recovery", 5, key="none")
    assert not model.exists()  # nothing recreated the checkpoint behind our back


# --- 4. SIGTERM drains ------------------------------------------------------------------------------------

def test_sigterm_finishes_the_running_stream_refuses_new_work_and_cleans_up(checkpoints, start_daemon):
    daemon = start_daemon(checkpoints["tiny-llama"], **TP2PP2, extra=["--drain-timeout", "60"])
    workers = worker_pids(daemon)
    streaming = stream_in_background(daemon, max_tokens=150)
    wait_for(lambda: len(streaming["chunks"]) >= 3, 60, "first chunks")

    daemon.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 30
    while refused is None and time.monotonic() < deadline:  # the gate closes as soon as the signal is handled
        try:
            response = httpx.post(f"{daemon.base_url}/v1/completions", timeout=10,
                                  json={"model": daemon.model_name, "prompt": "late", "max_tokens": 2})
        except httpx.ConnectError:
            refused = "connection refused"
            break
        if response.status_code == 503:
            refused = response.json()["error"]["message"]
        else:
            assert response.status_code == 200  # only a request that came before the signal was handled
    assert refused, "new requests were not refused while draining"
    assert streaming["thread"].is_alive() or streaming["finish_reason"] == "length"

    assert daemon.proc.wait(90) == 0
    streaming["thread"].join(10)
    assert streaming["error"] is None and streaming["finish_reason"] == "length"
    assert len("".join(streaming["chunks"])) > 0
    assert not os.path.exists(daemon.socket)
    wait_for(lambda: all(gone(pid) for pid in workers), 10, "workers gone")


# --- 5. the weight store of a daemon killed with -9 -------------------------------------------------------

def test_a_new_daemon_reclaims_the_segment_of_a_killed_one(checkpoints, start_daemon):
    shm = Path("/dev/shm")
    before = {p.name for p in shm.glob("remp-*")}
    first = start_daemon(checkpoints["tiny-llama"], **TP2PP2)
    # remp-<uid>-<pid>-<random>: the daemon names its segment after itself
    created = [p.name for p in shm.glob(f"remp-{os.getuid()}-{first.proc.pid}-*") if p.name not in before]
    assert len(created) == 1, created
    segment = created[0]
    workers = worker_pids(first)

    first.proc.kill()
    first.proc.wait(10)
    wait_for(lambda: all(gone(pid) for pid in workers), 5, "workers dead with their daemon (PDEATHSIG)")
    assert (shm / segment).exists()  # nobody cleaned up after a kill -9

    second = start_daemon(checkpoints["tiny-llama"], workers=1)  # one worker starts faster; reclaim is per daemon
    assert not (shm / segment).exists()
    assert "stale weight store" in second.log.read_text()
    own = list(shm.glob(f"remp-{os.getuid()}-{second.proc.pid}-*"))
    assert len(own) == 1
    assert second.stop() == 0
    assert not own[0].exists()  # a clean stop removes its own segment


def test_the_api_key_never_reaches_the_daemon_log(daemon):
    for key in (KEY, f"{KEY}-wrong", "none"):
        try:
            greedy(daemon, "Key check", 2, key=key)
        except openai.AuthenticationError:
            pass
    log = daemon.log.read_text()
    assert "serving" in log and KEY not in log


def test_a_real_stream_parses_the_same_split_at_every_byte(daemon):
    """The official client's SSE decoder, and a line-based reader like bench/load.py's, on the daemon's own
    bytes cut at every boundary: TCP may deliver any split, and each must give the same events."""
    from openai._streaming import SSEDecoder

    body = {"model": daemon.model_name, "prompt": "Split me: ünïcödé", "max_tokens": 12, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    wire = httpx.post(f"{daemon.base_url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}).content
    assert wire.endswith(b"data: [DONE]\n\n")

    def events(chunks) -> list[str]:
        return [event.data for event in SSEDecoder().iter_bytes(iter(chunks))]

    whole = events([wire])
    assert whole[-1] == "[DONE]" and len(whole) >= 4  # text chunks (a partial UTF-8 char waits), usage, DONE
    assert json.loads(whole[-2])["usage"]["completion_tokens"] == 12
    for cut in range(1, len(wire)):
        assert events([wire[:cut], wire[cut:]]) == whole, f"split at byte {cut}"
    assert events([wire[i:i + 1] for i in range(len(wire))]) == whole  # one byte per read
    lines = [line for line in wire.decode().split("\n") if line.startswith("data: ")]
    assert [line[6:] for line in lines] == whole
