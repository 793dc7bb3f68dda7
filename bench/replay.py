"""The replayer: Poisson arrivals following a rate schedule, prompt and output lengths drawn from distributions,
each request streamed through the official `openai` client; per phase of the schedule TTFT and inter-token
latency p50/p99, output tokens/s and SLO attainment. bench/workload.py runs it against rempd's topologies."""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from rempd.policy.window import percentile

DAY = "low:0.15,rising:0.15-1.0,peak:1.0,falling:1.0-0.15"  # phase:relative rate (a-b ramps), like figure 1


@dataclass
class Phase:
    name: str
    start: float  # seconds from the schedule's start
    seconds: float
    rate_from: float  # requests/s
    rate_to: float

    def rate(self, t: float) -> float:
        return self.rate_from + (self.rate_to - self.rate_from) * (t - self.start) / self.seconds


def schedule(spec: str, peak_rate: float, duration: float) -> list[Phase]:
    """"low:0.15,rising:0.15-1,..." → phases of equal length whose rates are fractions of peak_rate."""
    parts = [p.split(":") for p in spec.split(",")]
    each, phases = duration / len(parts), []
    for i, (name, rel) in enumerate(parts):
        lo, _, hi = rel.partition("-")
        phases.append(Phase(name, i * each, each, float(lo) * peak_rate, float(hi or lo) * peak_rate))
    return phases


def arrivals(phases: list[Phase], rng: random.Random) -> list[tuple[float, int]]:
    """A non-homogeneous Poisson process by thinning: (time, phase index) of every arrival."""
    top = max(max(p.rate_from, p.rate_to) for p in phases)
    end, t, out = phases[-1].start + phases[-1].seconds, 0.0, []
    while top > 0:
        t += rng.expovariate(top)
        if t >= end:
            break
        index = next(i for i, p in enumerate(phases) if t < p.start + p.seconds)
        if rng.random() * top < phases[index].rate(t):
            out.append((t, index))
    return out


@dataclass
class Lengths:
    """Log-normal token counts with the given mean, clipped to [lo, hi]; sigma 0 gives the mean exactly."""
    mean: int
    sigma: float = 0.5
    lo: int = 1
    hi: int = 1 << 20

    def draw(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return self.mean
        value = rng.lognormvariate(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma)
        return max(self.lo, min(self.hi, round(value)))


@dataclass
class Record:
    phase: int
    sent: float  # seconds from the schedule's start
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    itl: float | None = None
    e2e: float | None = None
    error: str | None = None


async def one_request(client, model: str, prompt: list[int], max_tokens: int, record: Record) -> None:
    sent = time.perf_counter()
    first = last = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                first = first or last
    except Exception as exc:  # noqa: BLE001 - every failure is a missed request, recorded with its reason
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    if first is None:
        record.error = "no text streamed"
        return
    record.ttft, record.e2e = first - sent, last - sent
    record.itl = (last - first) / (record.output_tokens - 1) if record.output_tokens > 1 else 0.0


async def replay(url: str, model: str, phases: list[Phase], prompt: Lengths, output: Lengths, seed: int,
                 api_key: str = "none") -> list[Record]:
    """Sends every arrival at its time (never waiting for earlier ones) and waits for all to finish."""
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    plan = [(t, i, [rng.randrange(10, 250) for _ in range(prompt.draw(rng))], output.draw(rng))
            for t, i in arrivals(phases, rng)]
    records: list[Record] = []
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600.0) as client:
        begin, tasks = time.perf_counter(), []
        for at, index, ids, max_tokens in plan:
            delay = at - (time.perf_counter() - begin)
            if delay > 0:
                await asyncio.sleep(delay)
            record = Record(index, time.perf_counter() - begin, len(ids))
            records.append(record)
            tasks.append(asyncio.create_task(one_request(client, model, ids, max_tokens, record)))
        await asyncio.gather(*tasks)
    return records


def delivered_tokens(records: list[Record], start: float, stop: float) -> float:
    """Output tokens streamed between `start` and `stop` (seconds from the schedule's start), each request's spread
    evenly from its first token to its last: what a topology served in that window, whoever asked when."""
    total = 0.0
    for r in records:
        if r.error is not None or r.ttft is None or r.e2e is None:
            continue
        first, last = r.sent + r.ttft, r.sent + r.e2e
        if last <= first:
            total += r.output_tokens if start <= first < stop else 0
        else:
            total += r.output_tokens * max(0.0, min(last, stop) - max(first, start)) / (last - first)
    return total


def summarize(records: list[Record], phases: list[Phase], slo_ttft: float, slo_itl: float) -> dict:
    """Per phase: latencies and SLO attainment of the requests sent in it, and the output tokens/s streamed in it
    (to all requests: those of a backlog too), against the tokens/s its requests asked for."""
    def stats(rs: list[Record], start: float, seconds: float) -> dict:
        ok = [r for r in rs if r.error is None]
        ttft, itl = [r.ttft for r in ok], [r.itl for r in ok]
        met = sum(1 for r in ok if r.ttft <= slo_ttft and r.itl <= slo_itl)
        return {"requests": len(rs), "failed": len(rs) - len(ok),
                "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
                "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
                "output_tokens_per_s": delivered_tokens(records, start, start + seconds) / seconds,
                "offered_tokens_per_s": sum(r.output_tokens for r in ok) / seconds,
                "slo_attainment": met / len(rs) if rs else None}
    total = phases[-1].start + phases[-1].seconds
    return {"phases": {p.name: stats([r for r in records if r.phase == i], p.start, p.seconds)
                       | {"rate": [p.rate_from, p.rate_to]} for i, p in enumerate(phases)},
            "all": stats(records, 0.0, total), "errors": sorted({r.error for r in records if r.error})[:5]}
