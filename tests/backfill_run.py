"""Requests streamed through an AsyncEngine, with a live switch once every one of them has produced a token, and
the wait for the idle engine to capture the decode graphs that switch left out (engine/graph_backfill.py)."""
from __future__ import annotations

import asyncio

from rempd.engine.async_engine import AsyncEngine
from rempd.engine.sampling_params import SamplingParams
from rempd.migrate.report import SwitchReport
from rempd.topology import Topology


async def serve(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, tag: str,
                target: Topology | None = None, mode: str | None = None,
                fault: tuple[str, str] | None = None) -> tuple[list[list[int]], SwitchReport | None]:
    tokens: list[list[int]] = [[] for _ in prompts]
    all_started = asyncio.Event()

    async def one(i: int, prompt: list[int]) -> None:
        async for out in engine.generate(f"{tag}{i}", prompt, params):
            tokens[i] += out.new_token_ids
            if all(tokens):
                all_started.set()

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
    report = None
    if target is not None:
        await all_started.wait()
        report, done = engine.start_switch(target, fault, mode)
        await done
    await asyncio.gather(*tasks)
    return tokens, report


async def wait_backfilled(engine: AsyncEngine, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.engine.graph_backfill.pending:
        assert asyncio.get_running_loop().time() < deadline, engine.engine.graph_backfill
        await asyncio.sleep(0.01)
