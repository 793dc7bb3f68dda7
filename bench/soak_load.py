"""The soak's load: requests of mixed lengths, half greedy and half seeded, each streamed through the official
openai client (or httpx where openai is not installed); a request that does not run to its length fails."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import httpx


@dataclass
class Request:
    index: int
    prompt: str
    max_tokens: int
    seed: int | None  # None: greedy

    @property
    def temperature(self) -> float:
        return 0.0 if self.seed is None else 0.8


def workload(count: int, short: int, long: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while rivers run to the sea".split()
    requests = []
    for i in range(count):
        length = rng.choice([2, 8, 40])  # prompt words: short, medium, long (prefill chunks and several blocks)
        prompt = f"Request {i}: " + " ".join(rng.choice(words) for _ in range(length))
        requests.append(Request(i, prompt, rng.choice([short, long]), None if i % 2 == 0 else 1000 + i))
    return requests


async def complete(client, model: str, request: Request) -> str:
    """One streamed completion through the official openai client, or through httpx where the openai package
    is not installed (the GPU machines carry only the wheels they need); both parse the same SSE."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "stream": True, "ignore_eos": True}
    if request.seed is not None:
        body["seed"] = request.seed
    text, reason = [], None
    if isinstance(client, httpx.AsyncClient):
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']}")
                    text.append(event["choices"][0]["text"])
                    reason = event["choices"][0]["finish_reason"] or reason
    else:
        extra = {k: body[k] for k in ("ignore_eos", "seed") if k in body}
        stream = await client.completions.create(model=model, prompt=request.prompt, max_tokens=request.max_tokens,
                                                 temperature=request.temperature, stream=True, extra_body=extra)
        async for event in stream:
            text.append(event.choices[0].text)
            reason = event.choices[0].finish_reason or reason
    if reason != "length":
        raise RuntimeError(f"request {request.index} ended with {reason!r}")
    return "".join(text)


def make_client(url: str, concurrency: int):
    try:
        from openai import AsyncOpenAI
    except ImportError:
        return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4))
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
