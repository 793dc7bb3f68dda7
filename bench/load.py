"""Streaming load against rempd's OpenAI API: every token's arrival time, for pauses and latencies."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Stream:
    prompt: str
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of every gap between consecutive tokens."""
        t = self.token_times
        return [(a, b - a) for a, b in zip(t, t[1:])]


async def stream_completion(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int,
                            temperature: float = 0.0, seed: int | None = None, stream: Stream | None = None) -> Stream:
    """Fills `stream` (or a new one) as tokens arrive, so a caller can watch progress."""
    stream = stream or Stream(prompt)
    stream.sent = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "ignore_eos": True}
    if seed is not None:
        body["seed"] = seed
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return stream
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    stream.token_times.append(time.perf_counter())
                    stream.text += choice["text"]
                stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
    except httpx.HTTPError as exc:
        stream.error = repr(exc)
    return stream


def serving_pause(streams: list[Stream], start: float, end: float) -> float:
    """The longest gap between consecutive tokens of any stream that overlaps [start, end]."""
    longest = 0.0
    for s in streams:
        for at, gap in s.gaps():
            if at <= end and at + gap >= start:
                longest = max(longest, gap)
    return longest


async def wait_healthy(base: str, timeout: float) -> float:
    """Seconds until /health answers 200."""
    begin = time.perf_counter()
    async with httpx.AsyncClient() as client:
        while time.perf_counter() - begin < timeout:
            try:
                if (await client.get(f"{base}/health", timeout=2)).status_code == 200:
                    return time.perf_counter() - begin
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{base} not healthy after {timeout} s")
