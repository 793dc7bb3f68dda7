"""Moving-window observations of the load and of the latency it gets. No torch.

The serving API feeds arrivals, first tokens and finishes (through its RequestTimer);
the policy runner adds a sample of the engine's queue and KV usage every tick. All calls come from the
daemon's asyncio loop, so no lock is needed.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

MAX_EVENTS = 50_000  # per kind: a bound on memory; at very high token rates the ITL window is its newest part


@dataclass
class Observation:
    window_s: float
    requests: int  # arrivals in the window
    arrival_rate: float  # requests/s
    completion_rate: float  # requests/s finished
    output_tokens_per_request: float | None  # mean of the requests finished in the window
    queue_len: float  # mean number waiting
    queue_always: bool  # someone waited at every sample: the engine did not keep up
    running: float  # mean number running
    kv_usage: float  # highest share of KV blocks in use
    ttft_p90: float | None  # seconds, of requests whose first token came in the window
    # seconds: of the requests finished in the window, each one's inter-token latency as an SLO counts it, (last
    # token - first) / (tokens - 1). Not single gaps: where prefills share steps with decodes (TP4 on 4x H100,
    # 7B), their gaps' p90 is a mixed step's 25 ms while requests averaged under 9 ms, and a pipeline's even
    # gaps looked better than they served: the policy ranked topologies against the SLO the wrong way round
    itl_p90: float | None

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class ObservationLog:
    def __init__(self) -> None:
        self.arrivals: deque[float] = deque(maxlen=MAX_EVENTS)
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=MAX_EVENTS)
        self.itls: deque[tuple[float, float]] = deque(maxlen=MAX_EVENTS)  # (finished at, the request's ITL)
        self.finishes: deque[tuple[float, int]] = deque(maxlen=MAX_EVENTS)
        self.samples: deque[tuple[float, int, int, float]] = deque(maxlen=MAX_EVENTS)

    def arrival(self, at: float) -> None:
        self.arrivals.append(at)

    def first_token(self, at: float, ttft: float) -> None:
        self.ttfts.append((at, ttft))

    def finished(self, at: float, output_tokens: int, itl: float | None = None) -> None:
        """itl: the request's inter-token latency, None with fewer than 2 tokens."""
        self.finishes.append((at, output_tokens))
        if itl is not None:
            self.itls.append((at, itl))

    def sample(self, at: float, waiting: int, running: int, kv_usage: float) -> None:
        self.samples.append((at, waiting, running, kv_usage))

    def window(self, now: float, seconds: float, latency_since: float = -math.inf) -> Observation:
        """The last `seconds`; latencies only from `latency_since` on (after a switch, the old topology's
        latencies say nothing about the new one)."""
        start = now - seconds
        arrivals = sum(1 for t in self.arrivals if t > start)
        finished = [n for t, n in self.finishes if t > start]
        samples = [s for s in self.samples if s[0] > start]
        lat_start = max(start, latency_since)
        return Observation(
            window_s=seconds, requests=arrivals, arrival_rate=arrivals / seconds,
            completion_rate=len(finished) / seconds,
            output_tokens_per_request=sum(finished) / len(finished) if finished else None,
            queue_len=sum(s[1] for s in samples) / len(samples) if samples else 0.0,
            queue_always=bool(samples) and all(s[1] > 0 for s in samples),
            running=sum(s[2] for s in samples) / len(samples) if samples else 0.0,
            kv_usage=max((s[3] for s in samples), default=0.0),
            ttft_p90=percentile([v for t, v in self.ttfts if t > lat_start], 0.9),
            itl_p90=percentile([v for t, v in self.itls if t > lat_start], 0.9))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
