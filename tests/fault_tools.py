"""Helpers for the tests of a real daemon: its status, health, metrics and switches, its children and shared memory."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import psutil
from openai import AsyncOpenAI, OpenAI


def client(daemon, key: str = "none") -> OpenAI:
    # max_retries=0: the openai client retries a 503 on its own, which would hide what the daemon answered
    return OpenAI(base_url=f"{daemon.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(daemon, prompt: str, max_tokens: int, key: str = "none") -> str:
    return client(daemon, key).completions.create(model=daemon.model_name, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def status(daemon) -> dict:
    with daemon.control() as ctl:
        return ctl.get("/v1/status").json()


def switch(ctl: httpx.Client, tp: int, pp: int, **extra) -> dict:
    """POST /v1/switch (it must be accepted) and wait for the switch to end; its final report."""
    response = ctl.post("/v1/switch", json={"tp": tp, "pp": pp, **extra})
    assert response.status_code == 202, response.text
    while (report := ctl.get(f"/v1/switches/{response.json()['id']}").json())["state"] == "running":
        time.sleep(0.01)
    return report


async def stream_through_switches(daemon, targets: list[dict], prompts: list[str], max_tokens: int,
                                  chunks_between: int = 0) -> tuple[list[str], list[dict]]:
    """Stream every prompt greedily (openai client); once every stream has a few chunks, run the switches one
    after another, each after every unfinished stream got `chunks_between` more chunks from the topology before
    (0: back to back). The streamed texts, and each switch's final report."""
    client = AsyncOpenAI(base_url=f"{daemon.base_url}/v1", api_key="none")
    chunks: list[list[str]] = [[] for _ in prompts]

    async def one(i: int) -> str:
        stream = await client.completions.create(model=daemon.model_name, prompt=prompts[i], max_tokens=max_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for event in stream:
            chunks[i].append(event.choices[0].text)
        return "".join(chunks[i])

    async def each_stream_gets(count: int) -> None:
        wanted = [len(c) + count for c in chunks]
        while not all(len(c) >= w or t.done() for c, w, t in zip(chunks, wanted, tasks)):
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    await each_stream_gets(3)
    with daemon.control() as ctl:
        ids = []
        for target in targets:
            if ids:
                await each_stream_gets(chunks_between)
            ids.append((await asyncio.to_thread(switch, ctl, **target))["id"])
        texts = list(await asyncio.gather(*tasks))
        # read the reports again once the streams are done: the serving pause closes at the first token after
        return texts, [ctl.get(f"/v1/switches/{switch_id}").json() for switch_id in ids]


def health(daemon) -> int | None:
    try:
        return httpx.get(f"{daemon.base_url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def metric(daemon, name: str) -> float:
    text = httpx.get(f"{daemon.base_url}/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def gone(pid: int) -> bool:
    """Dead, or a zombie nobody has reaped yet: either way it holds no memory and runs nothing."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_children(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True) if not gone(p.pid)}


def store_segments(daemon_pid: int) -> list[str]:
    """The daemon's weight-store segments in /dev/shm (their names carry the owner's pid)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"remp-*-{daemon_pid}-*"))


def check_no_leaks(daemon) -> dict:
    """Exactly the workers in /v1/status run under the daemon, one weight store, the control socket there."""
    now = status(daemon)
    pids = {w["pid"] for w in now["workers"]}
    assert live_children(daemon.proc.pid) == pids, (live_children(daemon.proc.pid), pids)
    assert len(store_segments(daemon.proc.pid)) == 1, store_segments(daemon.proc.pid)
    assert Path(daemon.socket).is_socket()
    return now


STREAM_PROMPT = "A long story:"


def stream_in_background(daemon, max_tokens: int, prompt: str = STREAM_PROMPT) -> dict:
    """Stream one completion on a thread; the dict fills with its chunks and its outcome."""
    result: dict = {"chunks": [], "error": None, "finish_reason": None}

    def run() -> None:
        try:
            for event in client(daemon).completions.create(
                    model=daemon.model_name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                    stream=True, extra_body={"ignore_eos": True}):
                result["chunks"].append(event.choices[0].text)
                result["finish_reason"] = event.choices[0].finish_reason or result["finish_reason"]
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result
