"""The policy in the daemon: samples the engine every tick, learns profiles, and in `auto` mode starts switches.

Switches go through the same path as `rempctl switch` (api/switching.launch_switch), so they are planned,
reported in the history, counted in /metrics and announced to systemd the same way.
"""
from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from rempd.api.metrics import Family
from rempd.policy.decide import Decision, Policy, PolicyConfig
from rempd.policy.profile import ProfileSet
from rempd.policy.sweep import ProfileSweep
from rempd.policy.window import ObservationLog, Observation
from rempd.topology import Topology, valid_topologies

log = logging.getLogger("rempd.policy")
PLAN_REFRESH_S = 60.0
SAVE_EVERY_S = 60.0


@dataclass
class RunnerConfig:
    mode: str = "manual"  # manual | auto
    interval_s: float = 1.0
    topologies: list[str] | None = None  # candidates; every valid one with a profile if None
    learn: bool = True  # fold what is observed while serving into the profiles
    learn_weight: float = 0.2
    profile_path: Path | None = None


class PolicyRunner:
    def __init__(self, config: RunnerConfig, policy: PolicyConfig, profiles: ProfileSet):
        self.config = config
        self.policy = Policy(policy)
        self.profiles = profiles
        self.log = ObservationLog()
        self.sweep = ProfileSweep(self)
        self.decisions: deque[dict] = deque(maxlen=200)
        self.counts: dict[str, int] = {}
        self.last: Decision | None = None
        self.observation: Observation | None = None
        self.switch_ended_at = -math.inf
        self.topology: str | None = None  # the topology the last tick saw
        self.last_learned = self.last_saved = time.monotonic()
        self.dirty = False
        self.plans: dict[tuple[str, str], tuple[float | None, float]] = {}  # (from, to) → (predicted s, when)
        self.engine: Any = None
        self.launch: Callable[[Any, Topology], tuple[Any, asyncio.Future]] | None = None

    # ---- control ----
    def set(self, mode: str | None = None, slo_ttft: float | None = None, slo_itl: float | None = None) -> None:
        if mode is not None and mode != self.config.mode:
            log.info("policy mode %s → %s", self.config.mode, mode)
            self.config.mode = mode
        if slo_ttft is not None:
            self.policy.config.slo_ttft = slo_ttft
        if slo_itl is not None:
            self.policy.config.slo_itl = slo_itl

    # ---- the loop ----
    async def run(self, engine: Any, launch: Callable[[Any, Topology], tuple[Any, asyncio.Future]]) -> None:
        self.engine, self.launch = engine, launch
        try:
            while True:
                await asyncio.sleep(self.config.interval_s)
                try:
                    await self.tick(time.monotonic())
                except Exception:  # the policy must never take serving down
                    log.exception("policy tick failed")
        finally:
            self.save()

    async def tick(self, now: float) -> None:
        engine = self.engine
        current = self.current()
        if self.topology is not None and current != self.topology:
            # switched by anyone (rempctl, the API, a benchmark), not only by this policy: the latencies seen
            # before belong to the old topology (a window holding a previous topology's queue once had the policy
            # leave a new one at once, its measured score 27 times the objective)
            self.switch_ended_at = max(self.switch_ended_at, now)
        self.topology = current
        stats = engine.stats()
        self.log.sample(now, stats.num_waiting, stats.num_running, stats.kv_usage)
        obs = self.observation = self.log.window(now, self.policy.config.window_s, self.switch_ended_at)
        if engine.running_switch() is not None or self.sweep.running or not engine.is_healthy:
            return
        self.learn(now, current, obs)
        if not self.profiles.topologies:
            return  # nothing to compare with until `rempctl profile` has run
        candidates = self.candidates()
        costs = await self.switch_costs(current, candidates)
        decision = self.policy.decide(now, current, obs, self.profiles, [c for c in candidates if c in costs]
                                      + [current], costs)
        self.record(decision)
        if decision.action == "switch" and self.config.mode == "auto":
            self.start_switch(now, decision)
        if now - self.last_saved >= SAVE_EVERY_S:
            self.save()

    def current(self) -> str:
        return str(self.engine.engine.placement.topology)

    def candidates(self, profiled_only: bool = True) -> list[str]:
        inner = self.engine.engine
        cfg = inner.model_config
        valid = [str(t) for t in valid_topologies(len(inner.devices), cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)]
        wanted = self.config.topologies
        return [t for t in valid if (t in self.profiles.topologies or not profiled_only)
                and (wanted is None or t in wanted)]

    async def switch_costs(self, current: str, candidates: list[str]) -> dict[str, float]:
        """Predicted seconds of a switch to each candidate (the plan's figure, scaled by how past switches
        compared with their predictions); candidates the plan refuses are left out."""
        now, costs, ratio = time.monotonic(), {}, self.calibration()
        for name in candidates:
            if name == current:
                continue
            cached = self.plans.get((current, name))
            if cached is None or now - cached[1] > PLAN_REFRESH_S:
                target = Topology.parse(name)
                try:
                    summary = await self.engine.plan(target)
                    cached = (float(summary["predicted"]["total"]), now)
                except Exception as exc:  # SwitchRefused: it does not fit, say, so it is no candidate
                    log.debug("no plan %s → %s: %s", current, name, exc)
                    cached = (None, now)
                self.plans[(current, name)] = cached
            if cached[0] is not None:
                costs[name] = cached[0] * ratio
        return costs

    def calibration(self) -> float:
        ratios = [r.total_seconds / r.predicted["total"] for r in self.engine.engine.switches
                  if r.state == "committed" and r.predicted.get("total")]
        return max(1.0, statistics.median(ratios)) if ratios else 1.0

    def learn(self, now: float, current: str, obs: Observation) -> None:
        """Once per full window spent on one topology, fold the window into that topology's profile."""
        c = self.policy.config
        profile = self.profiles.topologies.get(current)
        if (not self.config.learn or profile is None or now - self.last_learned < c.window_s
                or now - self.switch_ended_at < c.window_s or obs.requests < c.min_requests):
            return
        self.last_learned = now
        scale = (obs.output_tokens_per_request / self.profiles.output_tokens
                 if obs.output_tokens_per_request and self.profiles.output_tokens else 1.0)
        if obs.queue_always and obs.completion_rate < 0.9 * obs.arrival_rate:
            if profile.saturated(obs.completion_rate * scale):
                log.info("policy: %s saturated at %.2f requests/s; its ceiling is now that", current,
                         profile.ceiling)
                self.dirty = True
        elif obs.ttft_p90 is not None and obs.itl_p90 is not None:
            self.dirty |= profile.observe(obs.arrival_rate * scale, obs.ttft_p90, obs.itl_p90,
                                          self.config.learn_weight)

    def record(self, decision: Decision) -> None:
        self.last = decision
        previous = self.decisions[-1] if self.decisions else None
        if previous is not None and (previous["action"], previous["target"]) == (decision.action, decision.target) \
                and decision.action != "switch":
            return  # the same verdict as the last one: keep the log readable
        entry = decision.to_dict() | {"time": time.time(), "mode": self.config.mode}
        self.decisions.append(entry)
        self.counts[decision.action] = self.counts.get(decision.action, 0) + 1
        if self.config.mode == "auto":
            log.info("policy %s: %s", decision.action, decision.reason)
        else:  # advice nobody acts on: kept for `rempctl policy show`, not pushed into the journal
            log.debug("policy advice %s: %s", decision.action, decision.reason)

    def start_switch(self, now: float, decision: Decision) -> None:
        target = Topology.parse(decision.target)
        try:
            report, done = self.launch(self.engine, target)
        except Exception as exc:  # a manual switch got in first, or the plan refused
            log.warning("policy could not start a switch to %s: %s", decision.target, exc)
            return
        self.policy.switched(now, decision.current, decision.load)
        self.decisions[-1]["switch_id"] = report.id

        def finished(_: asyncio.Future) -> None:
            self.switch_ended_at = time.monotonic()
            if report.state != "committed":
                log.warning("policy switch %s to %s %s: %s", report.id, decision.target, report.state, report.error)
        done.add_done_callback(finished)

    def save(self) -> None:
        self.last_saved = time.monotonic()
        if not self.dirty or self.config.profile_path is None:
            return
        try:
            self.profiles.save(self.config.profile_path)
            self.dirty = False
        except OSError as exc:
            log.warning("cannot save profiles to %s: %s", self.config.profile_path, exc)

    # ---- what rempctl and /metrics show ----
    def show(self) -> dict:
        c = self.policy.config
        return {"mode": self.config.mode, "config": c.to_dict() | {"interval_s": self.config.interval_s,
                                                                    "topologies": self.config.topologies,
                                                                    "learn": self.config.learn},
                "observation": self.observation.to_dict() if self.observation else None,
                "current": self.last.current if self.last else None,
                "decision": self.last.to_dict() if self.last else None,
                "decisions": list(self.decisions)[-20:],
                "profiles": self.profiles.to_dict(),
                "profile_path": str(self.config.profile_path) if self.config.profile_path else None,
                "sweep": self.sweep.to_dict()}

    def status(self) -> dict:
        last = self.last.to_dict() | {"time": time.time()} if self.last else None
        return {"mode": self.config.mode, "slo_ttft": self.policy.config.slo_ttft,
                "slo_itl": self.policy.config.slo_itl, "load": round(self.last.load, 4) if self.last else None,
                "profiled": sorted(self.profiles.topologies),
                "decision": {k: last[k] for k in ("time", "action", "current", "target", "reason")} if last else None}

    def families(self) -> Iterator[Family]:
        c, obs = self.policy.config, self.observation
        yield Family("remp:policy_auto", "gauge", "1 while the policy switches on its own.",
                     [({}, 1.0 if self.config.mode == "auto" else 0.0)])
        yield Family("remp:policy_slo_seconds", "gauge", "The policy's latency objectives (p90).",
                     [({"metric": "ttft"}, c.slo_ttft), ({"metric": "itl"}, c.slo_itl)])
        yield Family("remp:policy_decisions", "counter", "Policy decisions by action (repeats not counted).",
                     [({"action": a}, n) for a, n in sorted(({"stay": 0, "hold": 0, "switch": 0}
                                                              | self.counts).items())])
        if self.last is not None:
            yield Family("remp:policy_load", "gauge", "Load the policy sees, requests/s of the profile shape.",
                         [({}, self.last.load)])
            yield Family("remp:policy_last_decision_info", "gauge", "The latest decision (value 1).",
                         [({"action": self.last.action, "current": self.last.current,
                            "target": self.last.target or ""}, 1.0)])
        if obs is not None:
            yield Family("remp:policy_window_arrival_rate", "gauge", "Arrivals per second in the window.",
                         [({}, obs.arrival_rate)])
            yield Family("remp:policy_window_p90_seconds", "gauge", "p90 latencies in the window.",
                         [({"metric": k}, v) for k, v in (("ttft", obs.ttft_p90), ("itl", obs.itl_p90))
                          if v is not None])
