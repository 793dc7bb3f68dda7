"""A real daemon in `auto` mode: the load steps up, the policy switches; it steps back down, the policy switches back.

On CPU the tiny model's topologies differ little in speed, so the profiles are given: TP2PP1 is fast but carries at
most 3 requests/s, TP1PP2 is slower but carries 50. The objectives are loose enough that the measured latency of
the tiny model never decides anything: which topology is right depends only on the load, which the daemon must
observe itself (arrivals through the OpenAI API, replayed by bench/replay.py with the official client) and act
on through its own switch path. Profile learning is off so that the given profiles stay what the test says.
"""
import asyncio
import importlib
import json
import sys
from pathlib import Path

import httpx
import pytest

from rempd.policy.profile import ProfilePoint, ProfileSet, TopologyProfile, profile_path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_replayer():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("replay")


def write_profiles(state_dir: Path, model: str) -> None:
    profiles = ProfileSet(model, "cpu4", prompt_tokens=16, output_tokens=8, topologies={
        "TP2PP1": TopologyProfile("TP2PP1", 3.0, [ProfilePoint(0.2, 0.5, 0.1), ProfilePoint(3.0, 0.5, 0.1)]),
        "TP1PP2": TopologyProfile("TP1PP2", 50.0, [ProfilePoint(0.2, 3.0, 0.6), ProfilePoint(50.0, 3.0, 0.6)])})
    profiles.save(profile_path(state_dir, model, "cpu4"))


@pytest.mark.timeout(240)
def test_auto_mode_switches_up_with_the_load_and_back_down(checkpoints, start_daemon, tmp_path):
    model = checkpoints["tiny-llama"]
    write_profiles(tmp_path / "state", model.name)
    daemon = start_daemon(model, tp=2, pp=1, extra=[
        "--state-dir", str(tmp_path / "state"), "--policy", "auto", "--slo-ttft", "5", "--slo-itl", "1",
        "--policy-window", "2", "--policy-dwell", "3", "--policy-interval", "0.2", "--no-policy-learn",
        "--policy-topologies", "TP2PP1,TP1PP2"])
    replayer = load_replayer()
    # low 0.5/s for 4 s, 8/s for 7 s, low again for 9 s
    phases = [replayer.Phase("low", 0, 4, 0.5, 0.5), replayer.Phase("peak", 4, 7, 8.0, 8.0),
              replayer.Phase("after", 11, 9, 0.5, 0.5)]
    records = asyncio.run(replayer.replay(daemon.base_url, daemon.model_name, phases, replayer.Lengths(16, 0.0),
                                          replayer.Lengths(8, 0.0), seed=3))
    assert len(records) > 30
    assert [r.error for r in records if r.error] == []

    with daemon.control() as ctl:
        switches = ctl.get("/v1/switches").json()
        policy = ctl.get("/v1/policy").json()
        status = ctl.get("/v1/status").json()
    moves = [(s["source"].split(" ")[0], s["target"], s["state"]) for s in switches]
    assert moves == [("TP2PP1", "TP1PP2", "committed"), ("TP1PP2", "TP2PP1", "committed")], (moves, policy["decisions"])
    started = [s["started_at"] for s in switches]
    assert started[1] - started[0] >= 3.0  # the dwell time
    acted = [d for d in policy["decisions"] if d["action"] == "switch"]
    assert [d["target"] for d in acted] == ["TP1PP2", "TP2PP1"]
    assert "TP2PP1 breaks the SLO" in acted[0]["reason"] and "costs more" in acted[1]["reason"], acted
    assert acted[0]["load"] > 3.0 > acted[1]["load"]  # it saw the load rise above TP2PP1's ceiling, then fall
    assert status["topology"] == {"tp": 2, "pp": 1}
    assert status["policy"]["mode"] == "auto" and status["policy"]["decision"]["current"] == "TP2PP1"

    metrics = httpx.get(f"{daemon.base_url}/metrics").text
    assert 'remp:policy_decisions_total{action="switch"} 2.0' in metrics
    assert 'remp:topology_switch_total{model_name="tiny-llama",result="ok"} 2.0' in metrics
    assert "remp:policy_auto 1.0" in metrics


def test_rempctl_policy_and_profile_against_a_daemon(checkpoints, start_daemon, tmp_path):
    """`rempctl profile` measures and stores profiles; `policy auto|manual|show` set and show the policy."""
    model = checkpoints["tiny-llama"]
    daemon = start_daemon(model, tp=2, pp=1, extra=["--state-dir", str(tmp_path / "state")])

    refused = daemon.rempctl("policy", "auto")
    assert refused.returncode == 1 and "no profiles yet" in refused.stderr
    done = daemon.rempctl("profile", "--topologies", "TP2PP1,TP1PP2", "--concurrency", "1,2", "--requests", "4",
                          "--prompt-tokens", "8", "--output-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    sweep = json.loads(done.stdout)
    assert sweep["state"] == "done" and set(sweep["measured"]) == {"TP2PP1", "TP1PP2"}
    for measured in sweep["measured"].values():
        assert measured["ceiling"] > 0 and len(measured["points"]) == 2
    stored = json.loads(Path(sweep["profile_path"]).read_text())
    assert set(stored["topologies"]) == {"TP2PP1", "TP1PP2"} and stored["prompt_tokens"] == 8
    with daemon.control() as ctl:
        assert ctl.get("/v1/status").json()["topology"] == {"tp": 2, "pp": 1}  # back where it started

    shown = daemon.rempctl("policy", "auto", "--slo-ttft", "2.5", "--slo-itl", "0.4")
    assert shown.returncode == 0 and "policy auto" in shown.stdout and "TTFT p90 ≤ 2.5 s" in shown.stdout
    assert daemon.rempctl("policy", "manual").returncode == 0
    status = daemon.rempctl("status")
    assert "policy     manual, TTFT p90 ≤ 2.5 s, ITL p90 ≤ 0.4 s" in status.stdout, status.stdout
