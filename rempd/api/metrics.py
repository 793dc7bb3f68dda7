"""Prometheus metrics, `remp:` names mirroring vLLM's `vllm:` ones so dashboards and aiperf carry over.

Latencies are kept here in plain histograms; gauges (running, waiting, KV, topology) are read from
the engine at scrape time. The exposition goes through prometheus_client when it is installed and
through a small hand-written text renderer otherwise; both print the same families.
"""
from __future__ import annotations

import bisect
import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineView(Protocol):
    """What a scrape reads from the engine (AsyncEngine has it)."""
    def stats(self) -> Any: ...
    def status(self) -> dict: ...
    @property
    def is_healthy(self) -> bool: ...


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        bounds = [_number(b) for b in self.buckets] + ["+Inf"]
        running, out = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class Family:
    """One metric family, renderer-neutral. Counter names carry no `_total`; the renderers add it."""
    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    samples: list[tuple[dict[str, str], float | Histogram]]


class Metrics:
    """Owned by the daemon, fed by the serving API, rendered on GET /metrics."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.switch_duration = Histogram(SWITCH_BUCKETS)
        self.finished: dict[str, int] = {}
        self.switches: dict[str, int] = {}
        self.switch_cut = {mode: Histogram(LATENCY_BUCKETS) for mode in ("staged", "stop_the_world")}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.observations: Any = None  # a policy.window.ObservationLog that hears every request, if set
        self.sources: list[Any] = []  # callables yielding more families (the policy's)

    def record_finished(self, reason: str, prompt_tokens: int, completion_tokens: int, e2e_s: float) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.e2e.observe(e2e_s)

    def record_switch(self, duration_s: float, result: str = "ok", cut_s: float | None = None,
                      mode: str = "stop_the_world") -> None:
        """result: "ok", "rolled_back", "refused" or "failed"; cut_s: seconds the engine did not step (the serving pause a
        committed switch caused), by the mode it ran in."""
        self.switches[result] = self.switches.get(result, 0) + 1
        self.switch_duration.observe(duration_s)
        if cut_s is not None and mode in self.switch_cut:
            self.switch_cut[mode].observe(cut_s)

    def families(self, engine: EngineView | None) -> Iterator[Family]:
        m = {"model_name": self.model_name}
        yield Family("remp:time_to_first_token_seconds", "histogram", "Time to first token.", [(m, self.ttft)])
        yield Family("remp:inter_token_latency_seconds", "histogram", "Time between two output tokens.",
                     [(m, self.itl)])
        yield Family("remp:e2e_request_latency_seconds", "histogram", "Request latency, arrival to last token.",
                     [(m, self.e2e)])
        yield Family("remp:request_success", "counter", "Finished requests by finish reason.",
                     [({**m, "finished_reason": r}, n) for r, n in sorted(self.finished.items())])
        yield Family("remp:prompt_tokens", "counter", "Prompt tokens of finished requests.", [(m, self.prompt_tokens)])
        yield Family("remp:generation_tokens", "counter", "Generated tokens of finished requests.",
                     [(m, self.generation_tokens)])
        switches = {"ok": 0, **self.switches}
        yield Family("remp:topology_switch", "counter", "Topology switches by result.",
                     [({**m, "result": r}, n) for r, n in sorted(switches.items())])
        yield Family("remp:topology_switch_duration_seconds", "histogram", "Duration of a topology switch.",
                     [(m, self.switch_duration)])
        yield Family("remp:topology_switch_pause_seconds", "histogram",
                     "Serving pause of a committed switch: seconds the engine did not step (a staged switch's cut).",
                     [({**m, "mode": mode}, h) for mode, h in self.switch_cut.items()])
        if engine is None:
            return
        stats = engine.stats()
        raw = engine.status()
        topology = raw.get("topology") or {}
        yield Family("remp:num_requests_running", "gauge", "Requests in the running batch.", [(m, stats.num_running)])
        yield Family("remp:num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                     [(m, stats.num_waiting)])
        yield Family("remp:kv_cache_usage_perc", "gauge", "Share of KV blocks in use, 0 to 1.", [(m, stats.kv_usage)])
        yield Family("remp:num_preemptions", "counter", "Requests preempted for recompute.",
                     [(m, stats.num_preempted)])
        for source in self.sources:
            yield from source()
        yield Family("remp:engine_healthy", "gauge", "1 while every worker is alive.",
                     [(m, 1.0 if engine.is_healthy else 0.0)])
        yield Family("remp:worker_recoveries", "counter", "Rebuilds of the worker pool after a worker failure.",
                     [(m, float(raw.get("num_recoveries", 0)))])
        yield Family("remp:devices_lost", "gauge", "Devices dropped because their worker could not start again.",
                     [(m, float(len(raw.get("lost_devices") or [])))])
        yield Family("remp:decode_graphs_pending", "gauge", "Decode-graph buckets a switch left out, to capture "
                     "while idle.", [(m, float(len(raw.get("graphs_pending") or [])))])
        yield Family("remp:decode_graphs_backfilled", "counter", "Decode-graph buckets captured while idle after a "
                     "switch.", [(m, float(raw.get("graphs_backfilled", 0)))])
        if topology:
            tp, pp = str(topology["tp"]), str(topology["pp"])
            yield Family("remp:topology_info", "gauge", "The current topology (value 1).",
                         [({**m, "tp": tp, "pp": pp}, 1.0)])
            yield Family("remp:topology_tp", "gauge", "Current tensor-parallel degree.", [(m, float(tp))])
            yield Family("remp:topology_pp", "gauge", "Current pipeline-parallel degree.", [(m, float(pp))])

    def render(self, engine: EngineView | None) -> bytes:
        families = list(self.families(engine))
        if importlib.util.find_spec("prometheus_client") is None:
            return render_text(families).encode()
        return render_prometheus_client(families)


class RequestTimer:
    """Times one request into the latency histograms, from its arrival at the API."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrival = self.last = time.monotonic()
        self.seen_token = False
        self.first_token_at = 0.0
        self.observations = metrics.observations
        if self.observations is not None:
            self.observations.arrival(self.arrival)

    def tick(self, out: Any) -> None:
        """Called with every RequestOutput."""
        if not out.new_token_ids:
            return
        now = time.monotonic()
        if self.seen_token:
            self.metrics.itl.observe(now - self.last)
        else:
            self.metrics.ttft.observe(now - self.arrival)
            if self.observations is not None:
                self.observations.first_token(now, now - self.arrival)
            self.seen_token, self.first_token_at = True, now
        self.last = now

    def finish(self, out: Any) -> None:
        self.metrics.record_finished(out.finish_reason or "unknown", out.prompt_tokens, out.completion_tokens,
                                     time.monotonic() - self.arrival)
        if self.observations is not None:
            tokens = out.completion_tokens
            itl = (self.last - self.first_token_at) / (tokens - 1) if self.seen_token and tokens > 1 else None
            self.observations.finished(time.monotonic(), tokens, itl)


def render_text(families: list[Family]) -> str:
    lines = []
    for fam in families:
        name = fam.name + "_total" if fam.kind == "counter" else fam.name
        lines.append(f"# HELP {name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {name} {fam.kind}")
        for labels, value in fam.samples:
            if isinstance(value, Histogram):
                for bound, count in value.cumulative():
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': bound})} {count}")
                lines.append(f"{name}_count{_labels(labels)} {value.count}")
                lines.append(f"{name}_sum{_labels(labels)} {_number(value.total)}")
            else:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def render_prometheus_client(families: list[Family]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def build() -> Iterator[Any]:
        for fam in families:
            keys = sorted({k for labels, _ in fam.samples for k in labels})
            kind = {"histogram": HistogramMetricFamily, "counter": CounterMetricFamily}.get(fam.kind, GaugeMetricFamily)
            out = kind(fam.name, fam.help, labels=keys)
            for labels, value in fam.samples:
                values = [labels[k] for k in keys]
                if isinstance(value, Histogram):
                    out.add_metric(values, [(b, float(c)) for b, c in value.cumulative()], value.total)
                else:
                    out.add_metric(values, float(value))
            yield out

    class Snapshot:  # one-shot collector: a registry per scrape keeps no global state
        def collect(self) -> Iterator[Any]:
            return build()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)
