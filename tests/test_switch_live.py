"""Live switches of a real rempd (4 gloo workers) while clients stream through the official openai client."""
import asyncio
import random
import time

import httpx
import pytest
from openai import OpenAI

import fault_tools


TOPOLOGIES = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]
PROMPTS = [f"Stream {i} says: " + "lorem ipsum dolor sit amet " * (i % 3 + 1) for i in range(8)]
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def daemon(faulty_daemon):
    return faulty_daemon


@pytest.fixture(scope="module")
def reference(daemon):
    """Greedy completions with no switch."""
    client = OpenAI(base_url=f"{daemon.base_url}/v1", api_key="none")
    return [client.completions.create(model=daemon.model_name, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def switch(ctl: httpx.Client, tp: int, pp: int, **extra) -> dict:
    # this module covers the stop-the-world transaction (the default); tests/test_switch_staged.py the staged one
    return fault_tools.switch(ctl, tp, pp, **{"mode": "stop_the_world", **extra})


async def stream_through_switches(daemon, targets: list[dict], prompts: list[str] = PROMPTS,
                                  max_tokens: int = MAX_TOKENS) -> tuple[list[str], list[dict]]:
    return await fault_tools.stream_through_switches(daemon, [{"mode": "stop_the_world", **t} for t in targets],
                                                     prompts, max_tokens)


def preempted(daemon) -> int:
    with daemon.control() as ctl:
        return ctl.get("/v1/status").json()["num_preempted"]


@pytest.mark.parametrize("source", TOPOLOGIES, ids=lambda t: f"from-TP{t[0]}PP{t[1]}")
def test_every_ordered_pair_keeps_streams_token_identical(daemon, reference, source):
    with daemon.control() as ctl:
        assert switch(ctl, *source)["state"] == "committed"
    for target in TOPOLOGIES:
        if target == source:
            continue
        before = preempted(daemon)
        texts, reports = asyncio.run(stream_through_switches(daemon, [{"tp": target[0], "pp": target[1]},
                                                                     {"tp": source[0], "pp": source[1]}]))
        assert [r["state"] for r in reports] == ["committed", "committed"], reports
        assert texts == reference, (source, target)
        assert reports[0]["requests_live"] == len(PROMPTS) and reports[0]["kv_blocks_migrated"] > 0
        assert reports[0]["requests_preempted"] == 0
        assert reports[0]["serving_pause_s"] >= reports[0]["phases"]["transform"]
        assert preempted(daemon) == before  # no KV was recomputed


def test_other_placements_of_the_same_shape(daemon, reference):
    targets = [{"tp": 2, "pp": 2, "placement": [3, 2, 1, 0]}, {"tp": 2, "pp": 2, "placement": [1, 3, 0, 2]},
               {"tp": 1, "pp": 4, "placement": [2, 0, 3, 1]}, {"tp": 4, "pp": 1, "placement": [3, 1, 2, 0]}]
    backfilled = fault_tools.metric(daemon, "remp:decode_graphs_backfilled_total")
    texts, reports = asyncio.run(stream_through_switches(daemon, targets))
    assert texts == reference
    assert [r["placement"] for r in reports] == [t["placement"] for t in targets]
    # once idle, the daemon goes through the decode-graph buckets the last commit left out (on CPU workers the
    # captures are no-ops: this checks the engine's bookkeeping as /metrics shows it)
    fault_tools.wait_for(lambda: fault_tools.metric(daemon, "remp:decode_graphs_pending") == 0, 10, "backfill")
    assert fault_tools.metric(daemon, "remp:decode_graphs_backfilled_total") > backfilled


def test_chain_of_twenty_random_switches(daemon, reference):
    rng = random.Random(20)
    targets = [dict(zip(("tp", "pp"), rng.choice(TOPOLOGIES))) for _ in range(20)]
    texts, reports = asyncio.run(stream_through_switches(daemon, targets))
    assert all(r["state"] == "committed" for r in reports)
    assert texts == reference


@pytest.mark.parametrize("phase", ["plan", "quiesce", "groups", "transform", "commit"])
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_fault_in_any_phase_rolls_back_and_serving_goes_on(daemon, reference, phase, kind):
    with daemon.control() as ctl:
        switch(ctl, 2, 2)
        texts, reports = asyncio.run(stream_through_switches(
            daemon, [{"tp": 4, "pp": 1, "fault": {"phase": phase, "kind": kind}}]))
        assert reports[0]["state"] == "rolled_back"
        # a raised error names its phase; a killed worker is noticed at the next call to the workers, by the
        # driver ("died") or first by a peer whose transfer with it broke — either way a worker is named
        assert phase in reports[0]["error"] if kind == "raise" else "worker" in reports[0]["error"]
        status = ctl.get("/v1/status").json()
        assert status["topology"] == {"tp": 2, "pp": 2}
        assert all(w["state"] in ("active", "standby") for w in status["workers"])
    assert texts == reference  # no request failed, and recomputed ones give the same tokens
    assert switch(daemon.control(), 4, 1)["state"] == "committed"


def test_a_switch_during_a_switch_gets_409(daemon):
    with daemon.control() as ctl:
        first = ctl.post("/v1/switch", json={"tp": 1, "pp": 4, "fault": {"phase": "transform", "kind": "delay"}})
        second = ctl.post("/v1/switch", json={"tp": 2, "pp": 1})
        assert first.status_code == 202
        assert second.status_code == 409 and first.json()["id"] in second.json()["error"]["message"]
        while ctl.get(f"/v1/switches/{first.json()['id']}").json()["state"] == "running":
            time.sleep(0.01)


@pytest.mark.parametrize("tp, pp, reason", [(3, 1, "does not divide the 4 attention heads"),
                                            (4, 2, "more than the 4 devices")])
def test_plan_refuses_invalid_targets_and_changes_nothing(daemon, tp, pp, reason):
    with daemon.control() as ctl:
        before = ctl.get("/v1/status").json()["topology"]
        for path in ("/v1/plan", "/v1/switch"):
            response = ctl.post(path, json={"tp": tp, "pp": pp})
            assert response.status_code == 400 and reason in response.json()["error"]["message"]
        assert ctl.get("/v1/status").json()["topology"] == before


def test_plan_refuses_a_target_whose_kv_pool_cannot_hold_the_context(checkpoints, start_daemon):
    # blocks are 4 KiB per worker at TP2PP2 and TP1PP4, 16 KiB at TP1PP1: 40 × 4 KiB holds 512 tokens, 10 do not
    daemon = start_daemon(checkpoints["tiny-llama"], tp=2, pp=2, extra=["--kv-cache-memory", str(40 * 4096)])
    with daemon.control() as ctl:
        response = ctl.post("/v1/plan", json={"tp": 1, "pp": 1})
        assert response.status_code == 400 and "does not fit" in response.json()["error"]["message"]
        plan = ctl.post("/v1/plan", json={"tp": 1, "pp": 4}).json()
        assert set(plan["bytes_by_source"]) >= {"weights_stay", "weights_peer", "weights_host", "kv_stay", "kv_peer"}
        assert plan["predicted"]["total"] > 0
