"""The topology policy: from observations and profiles to "stay", "hold" or "switch", with a reason. No torch.

Rules, in order (each decision's reason names the one that settled it):
1. load = the window's arrival rate, scaled to the profiles' request shape by output tokens, plus the
   backlog (queue length / window) that must also be cleared.
2. score(T) = max(TTFT / slo_ttft, ITL / slo_itl) predicted by T's profile at that load (below 1 meets both
   SLOs; infinite above T's ceiling). The current topology's score is the worse of its prediction and its
   measured window (once the window holds min_requests), and at least 1 while its KV cache is full.
3. cost(T) = score(T) + device_cost × devices(T). Candidates that may be entered: score ≤ 1 − headroom and
   load ≤ (1 − headroom) × ceiling. The best is the cheapest of those; when none qualifies, the one
   with the lowest score among those below (1 − headroom) × ceiling, else the lowest score (then the highest
   ceiling).
4. Switch to the best only if all hold:
   - dwell: at least dwell_s since the last switch;
   - gain: cost(current) − cost(best) > hysteresis × max(1, cost(current)) + switch_s / horizon_s, where
     switch_s is the plan's predicted switch time (calibrated by past switches): a paused second costs one
     SLO unit, spread over the horizon the new topology will serve (the gain is infinite when the best
     carries the load with headroom and the current one does not);
   - no return: a topology left less than memory_s ago is entered again only once the load has moved
     by return_band from where it was left (noise around one load cannot make the policy flap).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from rempd.policy.profile import ProfileSet
from rempd.policy.window import Observation
from rempd.topology import Topology

Action = Literal["stay", "hold", "switch"]


@dataclass
class PolicyConfig:
    slo_ttft: float = 1.0  # seconds, p90
    slo_itl: float = 0.1  # seconds, p90
    window_s: float = 30.0
    dwell_s: float = 60.0
    horizon_s: float | None = None  # how long a new topology is expected to serve; dwell_s if unset
    hysteresis: float = 0.1  # score units
    headroom: float = 0.1
    return_band: float = 0.25
    memory_s: float = 600.0
    device_cost: float = 0.0  # score units per device used; 0 when every topology keeps every device
    min_requests: int = 3
    kv_full: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    topology: str
    score: float
    cost: float
    ceiling: float
    enterable: bool

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else
                    (None if isinstance(v, float) else v)) for k, v in asdict(self).items()}


@dataclass
class Decision:
    at: float
    action: Action
    current: str
    target: str | None  # the best topology (switch or hold), None when staying
    reason: str
    load: float
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"at": self.at, "action": self.action, "current": self.current, "target": self.target,
                "reason": self.reason, "load": round(self.load, 4),
                "candidates": [c.to_dict() for c in self.candidates]}


def devices_of(topology: str) -> int:
    return Topology.parse(topology).size


class Policy:
    def __init__(self, config: PolicyConfig):
        self.config = config
        self.last_switch_at = -math.inf
        self.left: dict[str, tuple[float, float]] = {}  # topology → (when, load) it was last left

    def load(self, obs: Observation, profiles: ProfileSet) -> float:
        rate = obs.arrival_rate
        if obs.output_tokens_per_request and profiles.output_tokens:
            rate *= obs.output_tokens_per_request / profiles.output_tokens
        return rate + obs.queue_len / obs.window_s

    def score(self, topology: str, load: float, profiles: ProfileSet) -> tuple[float, float]:
        """(score, ceiling) of a topology at `load` from its profile."""
        profile = profiles.topologies[topology]
        ttft, itl = profile.predict(load)
        return max(ttft / self.config.slo_ttft, itl / self.config.slo_itl), profile.ceiling

    def measured(self, obs: Observation) -> float | None:
        c = self.config
        if obs.requests < c.min_requests or obs.ttft_p90 is None:
            return None
        return max(obs.ttft_p90 / c.slo_ttft, (obs.itl_p90 or 0.0) / c.slo_itl)

    def decide(self, now: float, current: str, obs: Observation, profiles: ProfileSet,
               candidates: list[str], switch_seconds: dict[str, float]) -> Decision:
        c = self.config
        load = self.load(obs, profiles)

        def carries(ceiling: float) -> bool:
            return load <= (1 - c.headroom) * ceiling

        ranked = []
        for name in candidates:
            if name not in profiles.topologies:
                continue
            score, ceiling = self.score(name, load, profiles)
            enterable = score <= 1 - c.headroom and carries(ceiling)
            ranked.append(Candidate(name, score, score + c.device_cost * devices_of(name), ceiling, enterable))
        measured = self.measured(obs)
        here = next((x for x in ranked if x.topology == current), None)
        if here is None:  # no profile for what runs now: only its measurement speaks for it
            here = Candidate(current, measured if measured is not None else math.inf, 0.0, 0.0, False)
            here.cost = here.score + c.device_cost * devices_of(current)
            ranked.append(here)
        else:
            worse = max(here.score, measured if measured is not None else 0.0,
                        1.0 if obs.kv_usage >= c.kv_full else 0.0)
            here.score, here.cost = worse, worse + c.device_cost * devices_of(current)

        enterable = [x for x in ranked if x.enterable and x is not here]
        if enterable:
            best = min(enterable + [here], key=lambda x: (x.cost, -x.ceiling, x is not here))
        else:
            # none meets the objectives: one near its ceiling builds a queue that every later request waits
            # behind (4x H100, 7B: TP4PP1 near 36/s had TTFT p50 1.6 s at peak and 3.3 s after it, where TP2PP2
            # stayed at 0.16 s), so those that carry the load with headroom come first, then the lowest score
            best = min(ranked, key=lambda x: (not carries(x.ceiling), x.cost, -x.ceiling, x is not here))

        def decision(action: Action, reason: str, target: str | None = best.topology) -> Decision:
            return Decision(now, action, current, target, reason, load, ranked)

        if best is here:
            return decision("stay", f"{current} is the cheapest at load {load:.2f}/s "
                                    f"(score {_num(here.score)})", None)
        switch_s = switch_seconds.get(best.topology, 0.0)
        # scores are latency over its objective: above 1 their noise grows with them (4x H100, 7B: a switch on a
        # 0.14 edge at score 1.8 went to a topology whose sweep had been optimistic, and queued), so there the
        # hysteresis scales with the current score
        scale = max(1.0, here.cost) if math.isfinite(here.cost) else 1.0
        threshold = c.hysteresis * scale + switch_s / (c.horizon_s or c.dwell_s)
        gain = math.inf if carries(best.ceiling) and not carries(here.ceiling) else _gain(here, best)
        if not gain > threshold:
            return decision("hold", f"{best.topology} gains {_num(gain)} over {current}, not more than "
                                    f"hysteresis + switch cost {threshold:.3f}")
        if now - self.last_switch_at < c.dwell_s:
            return decision("hold", f"dwell: {c.dwell_s - (now - self.last_switch_at):.1f} s left before "
                                    f"{current} may be left for {best.topology}")
        left = self.left.get(best.topology)
        if left is not None and now - left[0] < c.memory_s:
            at, left_load = left
            if abs(load - left_load) < c.return_band * left_load:
                return decision("hold", f"no return: {best.topology} was left {now - at:.0f} s ago at load "
                                        f"{left_load:.2f}/s and the load ({load:.2f}/s) has not moved "
                                        f"{c.return_band:.0%} since")
        why = "breaks the SLO" if here.score > 1 else "costs more"
        return decision("switch", f"{current} {why} at load {load:.2f}/s (score {_num(here.score)}); "
                                  f"{best.topology} scores {_num(best.score)}, gain {_num(gain)} > {threshold:.3f} "
                                  f"(switch ≈ {switch_s:.2f} s)")

    def switched(self, now: float, source: str, load: float) -> None:
        """Call when a switch that this policy started begins."""
        self.last_switch_at = now
        self.left[source] = (now, load)


def _gain(here: Candidate, best: Candidate) -> float:
    if math.isinf(here.cost) and math.isinf(best.cost):
        # both overloaded: the one with the higher ceiling drains the queue sooner
        return best.ceiling / here.ceiling - 1 if here.ceiling > 0 else math.inf
    return here.cost - best.cost


def _num(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "∞"
