"""The topology policy on synthetic observations: its rules, hysteresis, dwell time, no flapping under noise,
and the profiles it reads and learns. Pure logic: no daemon, no torch."""
import math

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from rempd.policy.decide import Policy, PolicyConfig
from rempd.policy.profile import ProfilePoint, ProfileSet, TopologyProfile, device_key, profile_path
from rempd.policy.window import Observation, ObservationLog, percentile

TOPOLOGIES = ["TP4PP1", "TP2PP2", "TP1PP4"]


def profiles() -> ProfileSet:
    """Shaped like the paper's case: TP4 is fastest but saturates first; PP4 is slowest but carries the most."""
    def prof(name, ceiling, ttft0, itl0):
        rates = [0.1 * ceiling, 0.5 * ceiling, ceiling]
        return TopologyProfile(name, ceiling, [ProfilePoint(r, ttft0 * (1 + 2 * r / ceiling), itl0 * (1 + r / ceiling))
                                               for r in rates])
    return ProfileSet("m", "cuda0-1-2-3", 128, 128, {
        "TP4PP1": prof("TP4PP1", 4.0, 0.10, 0.020),
        "TP2PP2": prof("TP2PP2", 8.0, 0.15, 0.030),
        "TP1PP4": prof("TP1PP4", 16.0, 0.20, 0.040)})


def obs(rate: float, ttft: float | None = None, itl: float | None = None, requests: int | None = None,
        queue: float = 0.0, kv: float = 0.1) -> Observation:
    return Observation(window_s=10.0, requests=int(rate * 10) if requests is None else requests, arrival_rate=rate,
                       completion_rate=rate, output_tokens_per_request=128.0, queue_len=queue, queue_always=queue > 0,
                       running=1.0, kv_usage=kv, ttft_p90=ttft, itl_p90=itl)


def config(**kw) -> PolicyConfig:
    return PolicyConfig(**({"slo_ttft": 1.0, "slo_itl": 0.1, "window_s": 10, "dwell_s": 20, "hysteresis": 0.1} | kw))


def decide(policy, now, current, o, switch_s=0.5):
    return policy.decide(now, current, o, profiles(), TOPOLOGIES, {t: switch_s for t in TOPOLOGIES})


def test_profile_interpolates_and_is_infinite_above_its_ceiling():
    p = TopologyProfile("TP1PP1", 10.0, [ProfilePoint(2.0, 0.1, 0.01), ProfilePoint(6.0, 0.5, 0.05)])
    assert p.predict(1.0) == (0.1, 0.01)
    assert p.predict(4.0) == pytest.approx((0.3, 0.03))
    assert p.predict(8.0) == (0.5, 0.05)
    assert p.predict(10.5) == (math.inf, math.inf)


def test_profile_latency_never_falls_as_the_load_rises():
    """A swept point lower than what serving showed at a lighter rate counts as that: the policy must not see a
    topology get faster as it gets busier."""
    p = TopologyProfile("TP1PP4", 30.0, [ProfilePoint(2.7, 0.014, 0.006),
                                         ProfilePoint(9.0, 0.05, 0.026, 3, "observed"),
                                         ProfilePoint(15.6, 0.128, 0.007)])
    assert p.predict(9.0) == pytest.approx((0.05, 0.026))
    assert p.predict(14.0) == pytest.approx((0.05 + (0.128 - 0.05) * 5 / 6.6, 0.026))
    assert p.predict(20.0) == pytest.approx((0.128, 0.026))


def test_profile_learns_latency_below_the_ceiling_and_a_lower_ceiling_from_saturation():
    p = TopologyProfile("TP1PP1", 10.0, [ProfilePoint(2.0, 0.1, 0.01)])
    assert p.observe(2.1, 0.3, 0.03, weight=0.5)  # within 15 %: refines the point
    assert len(p.points) == 1 and math.isclose(p.points[0].ttft, 0.2) and p.points[0].samples == 2
    assert p.observe(6.0, 0.4, 0.04, weight=0.5) and len(p.points) == 2 and p.points[1].source == "observed"
    assert not p.observe(12.0, 0.1, 0.01, weight=0.5)  # served above the ceiling: says nothing about the limit
    assert p.ceiling == 10.0
    assert p.saturated(5.0) and p.ceiling == 5.0 and [pt.rate for pt in p.points] == [2.0]
    assert not p.saturated(7.0)  # a saturation above the ceiling never raises it


def test_profiles_round_trip_on_disk_per_model_and_device_set(tmp_path):
    path = profile_path(tmp_path, "llama 2/7b", device_key([0, 1, 2, 3], 0))
    assert path == tmp_path / "profiles" / "llama_2_7b--cuda0-1-2-3.json"
    original = profiles()
    original.save(path)
    loaded = ProfileSet.load(path, "m", "cuda0-1-2-3")
    assert loaded.topologies == original.topologies
    assert ProfileSet.load(path, "other", "cuda0-1-2-3").topologies == {}  # another model's file: not ours
    assert ProfileSet.load(tmp_path / "missing.json", "m", "cpu4").topologies == {}


def test_window_rates_percentiles_and_latencies_only_after_a_switch():
    log = ObservationLog()
    for i in range(20):
        log.arrival(100 + i * 0.5)
        log.first_token(100 + i * 0.5, 0.1 * (i + 1))
        log.finished(100 + i * 0.5, 64, itl=0.01 * (i + 1))
        log.sample(100 + i * 0.5, 1 if i % 2 else 0, 2, 0.01 * i)
    o = log.window(109.75, 5.0)
    assert o.requests == 10 and o.arrival_rate == 2.0 and o.output_tokens_per_request == 64
    assert o.ttft_p90 == pytest.approx(1.9) and o.kv_usage == 0.19 and o.queue_len == 0.5 and not o.queue_always
    assert o.itl_p90 == pytest.approx(0.19)  # of the 10 requests finished in the window, each one's own ITL
    assert log.window(109.75, 5.0, latency_since=109.0).ttft_p90 == 2.0
    assert percentile([], 0.9) is None and percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_low_load_chooses_the_fastest_and_high_load_the_one_that_carries_it():
    policy = Policy(config())
    low = decide(policy, 100, "TP1PP4", obs(0.5))
    assert (low.action, low.target) == ("switch", "TP4PP1"), low.reason
    high = decide(Policy(config()), 100, "TP4PP1", obs(6.0))
    assert (high.action, high.target) == ("switch", "TP2PP2"), high.reason
    assert "breaks the SLO" in high.reason
    peak = decide(Policy(config()), 100, "TP2PP2", obs(12.0))
    assert peak.target == "TP1PP4" and peak.action == "switch"
    beyond = decide(Policy(config()), 100, "TP4PP1", obs(40.0))  # above every ceiling: the biggest ceiling
    assert beyond.target == "TP1PP4" and beyond.action == "switch"
    assert decide(Policy(config()), 100, "TP4PP1", obs(0.5)).action == "stay"


def test_when_none_meets_the_objectives_one_near_its_ceiling_comes_last():
    """At 3.8/s TP4PP1 (ceiling 4) predicts the lowest score, but it is within headroom of its ceiling: a queue
    would build there, so TP2PP2, which misses the objectives by more but carries the load, is chosen."""
    tight = config(slo_ttft=0.05, slo_itl=0.005)
    ps = profiles()
    scores = {t: Policy(tight).score(t, 3.8, ps)[0] for t in TOPOLOGIES}
    assert min(scores, key=scores.get) == "TP4PP1" and all(s > 1 for s in scores.values()), scores
    d = decide(Policy(tight), 100, "TP4PP1", obs(3.8))
    assert (d.action, d.target) == ("switch", "TP2PP2"), d.reason
    assert decide(Policy(tight), 100, "TP2PP2", obs(3.8)).action == "stay"
    # with room below every ceiling the lowest score still wins
    assert decide(Policy(tight), 100, "TP2PP2", obs(1.0)).target == "TP4PP1"


def test_a_switch_must_gain_more_than_hysteresis_plus_its_own_cost():
    # at 1.6/s TP4PP1 (current) scores ~0.36 and TP2PP2 ~0.4: no reason to move
    assert decide(Policy(config()), 100, "TP4PP1", obs(1.6)).action == "stay"
    # from TP2PP2 at 0.5/s the gain to TP4PP1 is ~0.06 < hysteresis 0.1
    held = decide(Policy(config()), 100, "TP2PP2", obs(0.5))
    assert (held.action, held.target) == ("hold", "TP4PP1") and "hysteresis" in held.reason
    # from TP1PP4 at 0.5/s the gain is ~0.11: enough for a cheap switch, not for a 20 s one over a 20 s horizon
    assert decide(Policy(config()), 100, "TP1PP4", obs(0.5), switch_s=0.0).action == "switch"
    costly = decide(Policy(config()), 100, "TP1PP4", obs(0.5), switch_s=20.0)
    assert costly.action == "hold" and "switch cost 1.100" in costly.reason


def test_measured_latency_and_a_full_kv_cache_count_against_the_current_topology():
    # predicted fine, but the window measured TTFT p90 of 1.5 s against a 1 s objective
    slow = decide(Policy(config()), 100, "TP1PP4", obs(2.0, ttft=1.5, itl=0.02))
    assert slow.action == "switch" and "breaks the SLO" in slow.reason
    too_few = decide(Policy(config()), 100, "TP2PP2", obs(2.0, ttft=1.5, itl=0.02, requests=2))
    assert too_few.action == "hold"  # 2 requests are no measurement; the profile alone barely prefers TP4PP1
    full = decide(Policy(config()), 100, "TP2PP2", obs(2.0, kv=0.99))
    here = next(c for c in full.candidates if c.topology == "TP2PP2")
    assert here.score >= 1.0 and full.action == "switch"


def test_dwell_time_holds_a_second_switch_until_it_has_passed():
    policy = Policy(config(dwell_s=20))
    first = decide(policy, 100, "TP4PP1", obs(6.0))
    assert first.action == "switch"
    policy.switched(100, "TP4PP1", first.load)
    for now in (101, 110, 119.9):  # the load leaps past TP2PP2's ceiling at once: still wait
        held = decide(policy, now, "TP2PP2", obs(12.0))
        assert held.action == "hold" and "dwell" in held.reason, held.reason
    assert decide(policy, 120.0, "TP2PP2", obs(12.0)).action == "switch"


def test_no_return_to_a_topology_until_the_load_has_really_moved():
    policy = Policy(config(dwell_s=10, return_band=0.25))
    policy.switched(100, "TP4PP1", 3.6)  # left TP4PP1 at 3.6/s
    # TP2PP2 measures badly, TP4PP1 would gain a lot, but 3.0/s is only 17 % below 3.6/s: could be noise
    held = decide(policy, 200, "TP2PP2", obs(3.0, ttft=0.9, itl=0.05))
    assert (held.action, held.target) == ("hold", "TP4PP1") and "no return" in held.reason, held.reason
    assert decide(policy, 200, "TP2PP2", obs(0.5, ttft=0.9, itl=0.05)).action == "switch"  # the load moved
    later = 100 + policy.config.memory_s + 1
    assert decide(policy, later, "TP2PP2", obs(3.0, ttft=0.9, itl=0.05)).action == "switch"  # forgotten


def test_device_cost_picks_the_smallest_topology_that_meets_the_objectives():
    small = ProfileSet("m", "cuda0-1-2-3", 128, 128, {
        "TP1PP1": TopologyProfile("TP1PP1", 2.0, [ProfilePoint(1.0, 0.5, 0.05)]),
        "TP4PP1": TopologyProfile("TP4PP1", 8.0, [ProfilePoint(1.0, 0.1, 0.01)])})
    policy = Policy(config(device_cost=0.2))
    d = policy.decide(100, "TP4PP1", obs(1.0), small, ["TP1PP1", "TP4PP1"], {"TP1PP1": 0.1})
    assert (d.action, d.target) == ("switch", "TP1PP1"), d.reason
    d = Policy(config()).decide(100, "TP4PP1", obs(1.0), small, ["TP1PP1", "TP4PP1"], {"TP1PP1": 0.1})
    assert d.action == "stay"  # without a device cost the faster one wins


def queueing_profiles() -> ProfileSet:
    """Latency rising as 1/(1 - 0.9 load/ceiling), as a queue's does: the curves cross, and near each crossing
    noise keeps tipping which topology looks best, which is what tempts a policy to flap."""
    def prof(name, ceiling, ttft0, itl0):
        rates = [f * ceiling for f in (0.05, 0.25, 0.5, 0.7, 0.85, 1.0)]
        return TopologyProfile(name, ceiling, [ProfilePoint(r, ttft0 / (1 - 0.9 * r / ceiling),
                                                            itl0 / (1 - 0.9 * r / ceiling)) for r in rates])
    return ProfileSet("m", "cuda0-1-2-3", 128, 128, {
        "TP4PP1": prof("TP4PP1", 4.0, 0.10, 0.020),
        "TP2PP2": prof("TP2PP2", 8.0, 0.15, 0.030),
        "TP1PP4": prof("TP1PP4", 16.0, 0.20, 0.040)})


@settings(max_examples=80, deadline=None)
@given(rate=st.floats(0.2, 20.0), noise=st.sampled_from([0.05, 0.1]), switch_s=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
       start=st.sampled_from(TOPOLOGIES), seed=st.integers(0, 2**32 - 1))
def test_noise_around_a_steady_load_never_makes_it_flap(rate, noise, switch_s, start, seed):
    """Steady load with up to ±10 % noise on rate and latencies: never back to a topology it left, switches at
    least a dwell apart, and at most one switch per topology it could move to."""
    import random

    rng = random.Random(seed)
    cfg = config(dwell_s=5, window_s=5)
    table = queueing_profiles()
    policy, current, visited, switch_times = Policy(cfg), start, [start], []
    for tick in range(300):
        now = 1000.0 + tick
        observed_rate = rate * (1 + rng.uniform(-noise, noise))
        ttft, itl = table.topologies[current].predict(observed_rate)
        jitter = 1 + rng.uniform(-noise, noise)
        measured = obs(observed_rate, min(ttft * jitter, 30.0), min(itl * jitter, 3.0))
        d = policy.decide(now, current, measured, table, TOPOLOGIES, {t: switch_s for t in TOPOLOGIES})
        if d.action == "switch":
            policy.switched(now, current, d.load)
            switch_times.append(now)
            current = d.target
            assert current not in visited, f"returned to {current}: {visited} ({d.reason})"
            visited.append(current)
    assert all(b - a >= cfg.dwell_s for a, b in zip(switch_times, switch_times[1:]))
    assert len(switch_times) <= len(TOPOLOGIES) - 1


def test_above_the_objectives_the_hysteresis_grows_with_the_current_score():
    """A gain of 0.14 switches at score 0.9 (hysteresis 0.1) but not at score 1.8, where it is within 0.1 × 1.8."""
    def flat(name: str, ttft: float) -> TopologyProfile:
        return TopologyProfile(name, 100.0, [ProfilePoint(r, ttft, 0.01) for r in (1.0, 50.0)])

    for here, there, action in [(0.90, 0.76, "switch"), (1.80, 1.66, "hold")]:
        ps = ProfileSet("m", "cuda0-1-2-3", 128, 128, {"TP2PP2": flat("TP2PP2", here), "TP1PP4": flat("TP1PP4", there)})
        d = Policy(config()).decide(100, "TP2PP2", obs(5.0), ps, ["TP1PP4", "TP2PP2"], {"TP1PP4": 0.0})
        assert d.action == action, (here, d.reason)


def test_a_topology_change_by_anyone_starts_a_new_latency_window():
    import asyncio
    from types import SimpleNamespace

    from rempd.policy.runner import PolicyRunner, RunnerConfig

    runner = PolicyRunner(RunnerConfig(), config(), profiles())
    placement = SimpleNamespace(topology="TP1PP4")
    runner.engine = SimpleNamespace(engine=SimpleNamespace(placement=placement), is_healthy=True,
                                    stats=lambda: SimpleNamespace(num_waiting=0, num_running=1, kv_usage=0.1),
                                    running_switch=lambda: "a switch: the tick stops after the window")
    runner.log.first_token(1.0, 8.0)  # the old topology's queue
    asyncio.run(runner.tick(2.0))
    assert runner.observation.ttft_p90 == 8.0
    placement.topology = "TP4PP1"  # switched by rempctl, say, not by the policy
    asyncio.run(runner.tick(3.0))
    assert runner.observation.ttft_p90 is None
    runner.log.first_token(3.5, 0.05)
    asyncio.run(runner.tick(4.0))
    assert runner.observation.ttft_p90 == 0.05
