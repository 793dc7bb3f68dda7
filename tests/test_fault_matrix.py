"""Fault matrix on a real daemon (tiny-llama, 4 gloo workers, TP2PP1 so two workers stand by): kill -9 or
SIGSTOP (past --worker-timeout) of an active or a standby worker, while idle, while serving, and in each phase
of a switch to TP1PP2. Every case must end serving on a valid topology with the same greedy tokens, the fault
reported in /v1/status and /metrics, and no process, weight-store segment or socket left over.

CI runs the cases in CI_CASES; REMP_FAULT_MATRIX=full runs all 28 (RELIABILITY.md records that run)."""
import os
import signal
from pathlib import Path

import httpx
import pytest

from conftest import RunningDaemon
from fault_tools import STREAM_PROMPT, check_no_leaks, gone, greedy, health, metric, status, stream_in_background, \
    store_segments, wait_for

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
PHASES = ["plan", "quiesce", "groups", "transform", "commit"]
WHEN = ["idle", "serving", *PHASES]
ALL_CASES = [(sig, role, when) for sig in SIGNALS for role in ("active", "standby") for when in WHEN]
CI_CASES = [("stop", "active", "serving"), ("stop", "standby", "transform")]  # kill -9: test_daemon_e2e, test_switch_live
CASES = ALL_CASES if os.environ.get("REMP_FAULT_MATRIX") == "full" else CI_CASES
WORKER_TIMEOUT = 5.0
PROMPT = "The fault matrix says"


@pytest.fixture(scope="module")
def unusable_file(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "unusable-devices"


@pytest.fixture(scope="module")
def daemon(checkpoints, tmp_path_factory, unusable_file):
    running = RunningDaemon(checkpoints["tiny-llama"], tmp_path_factory.mktemp("daemon"), tp=2, pp=1,
                            extra=["--worker-timeout", str(WORKER_TIMEOUT)],
                            env={"REMP_ENABLE_FAULT_INJECTION": "1",
                                 "REMP_FAULT_UNUSABLE_DEVICES_FILE": str(unusable_file)})
    yield running
    running.stop()
    assert not store_segments(running.proc.pid)


@pytest.fixture(scope="module")
def reference(daemon):
    return greedy(daemon, PROMPT, 12)


def victim(now: dict, role: str) -> int:
    if role == "active":
        return now["workers"][now["placement"][-1]]["pid"]
    return next(w["pid"] for w in now["workers"] if w["state"] == "standby")


def start_switch_held_in(ctl: httpx.Client, phase: str) -> str:
    """A switch to TP1PP2 that lingers a second at the start of `phase`; returns once it is there."""
    answer = ctl.post("/v1/switch", json={"tp": 1, "pp": 2, "fault": {"phase": phase, "kind": "delay"}})
    assert answer.status_code == 202, answer.text
    switch_id = answer.json()["id"]
    wait_for(lambda: ctl.get(f"/v1/switches/{switch_id}").json()["phase"] == phase, 30, f"switch in {phase}")
    return switch_id


def back_to_tp2pp1(daemon) -> None:
    with daemon.control() as ctl:
        now = ctl.get("/v1/status").json()
        if now["topology"] != {"tp": 2, "pp": 1} or now["placement"] != [0, 1]:
            answer = ctl.post("/v1/switch", json={"tp": 2, "pp": 1, "placement": [0, 1]})
            assert answer.status_code == 202, answer.text
            wait_for(lambda: ctl.get(f"/v1/switches/{answer.json()['id']}").json()["state"] != "running", 60,
                     "switch back")


@pytest.mark.parametrize("sig,role,when", CASES, ids=lambda v: str(v))
def test_a_worker_fault_ends_in_a_recovered_daemon(daemon, reference, sig, role, when):
    back_to_tp2pp1(daemon)
    before = check_no_leaks(daemon)
    recoveries = metric(daemon, "remp:worker_recoveries_total")
    pid = victim(before, role)
    stream = None
    with daemon.control() as ctl:
        if when != "idle":
            stream = stream_in_background(daemon, max_tokens=300)
            wait_for(lambda: len(stream["chunks"]) >= 3 or not stream["thread"].is_alive(), 60, "first chunks")
        switch_id = start_switch_held_in(ctl, when) if when in PHASES else None
        os.kill(pid, SIGNALS[sig])
        # a SIGSTOP shows only once a call to the worker (or the idle check) waits past the worker timeout
        wait_for(lambda: status(daemon)["num_recoveries"] > before["num_recoveries"] and health(daemon) == 200,
                 60 + 3 * WORKER_TIMEOUT, "recovery")
        report = None
        if switch_id:
            wait_for(lambda: ctl.get(f"/v1/switches/{switch_id}").json()["state"] != "running", 60, "switch end")
            report = ctl.get(f"/v1/switches/{switch_id}").json()
    if stream is not None:
        stream["thread"].join(60 + 3 * WORKER_TIMEOUT)
        assert not stream["thread"].is_alive(), "a stream running through the fault hung"
        # nothing lost: a request the fault met recomputes its KV on the rebuilt workers and goes on
        assert stream["error"] is None and stream["finish_reason"] == "length", stream["error"]
        assert "".join(stream["chunks"]) == greedy(daemon, STREAM_PROMPT, 300)
    if report is not None:
        # a fault the switch met rolls it back; a standby it never called is found after it committed
        assert report["state"] in ("rolled_back", "committed"), report

    after = check_no_leaks(daemon)
    assert gone(pid), f"the {sig}ped worker {pid} still runs"
    assert pid not in {w["pid"] for w in after["workers"]}
    assert all(w["state"] in ("active", "standby") for w in after["workers"])
    assert after["topology"] in ({"tp": 2, "pp": 1}, {"tp": 1, "pp": 2}) and len(after["workers"]) == 4
    assert after["last_recovery"] and "→" in after["last_recovery"]
    assert metric(daemon, "remp:worker_recoveries_total") > recoveries
    assert greedy(daemon, PROMPT, 12) == reference


def test_a_deleted_weight_store_is_reloaded_from_disk_at_the_next_recovery(daemon, reference):
    back_to_tp2pp1(daemon)
    before = check_no_leaks(daemon)
    (segment,) = store_segments(daemon.proc.pid)
    Path("/dev/shm", segment).unlink()  # e.g. an operator's cleanup script
    assert greedy(daemon, PROMPT, 12) == reference  # the workers' mappings outlive the name
    os.kill(before["workers"][0]["pid"], signal.SIGKILL)  # new workers could not attach the deleted name
    wait_for(lambda: status(daemon)["num_recoveries"] > before["num_recoveries"] and health(daemon) == 200,
             90, "recovery with a reloaded store")
    after = check_no_leaks(daemon)
    assert store_segments(daemon.proc.pid) != [segment]
    assert "weight store reloaded from disk" in after["last_recovery"]
    assert greedy(daemon, PROMPT, 12) == reference


def test_a_device_that_cannot_come_back_gives_a_smaller_topology(daemon, reference, unusable_file):
    back_to_tp2pp1(daemon)
    with daemon.control() as ctl:
        assert ctl.post("/v1/switch", json={"tp": 2, "pp": 2}).status_code == 202
        wait_for(lambda: status(daemon)["topology"] == {"tp": 2, "pp": 2}, 60, "TP2PP2")
    before = check_no_leaks(daemon)
    unusable_file.write_text("3\n")  # slot 3's worker will not start again, like a GPU that fell off the bus
    os.kill(before["workers"][3]["pid"], signal.SIGKILL)
    wait_for(lambda: status(daemon)["num_recoveries"] > before["num_recoveries"] and health(daemon) == 200,
             90, "recovery on three devices")
    after = check_no_leaks(daemon)
    # tiny-llama: 4 heads, 2 KV heads, 4 layers; on 3 devices the largest valid shape is TP1PP3
    assert after["topology"] == {"tp": 1, "pp": 3}
    assert len(after["workers"]) == 3 and all(w["state"] == "active" for w in after["workers"])
    assert len(after["lost_devices"]) == 1 and after["lost_devices"][0].startswith("slot 3 (cpu)")
    assert "TP2PP2 → TP1PP3" in after["last_recovery"]
    assert metric(daemon, "remp:devices_lost") == 1
    assert greedy(daemon, PROMPT, 12) == reference
    with daemon.control() as ctl:  # a topology that needs four devices is refused now
        refused = ctl.post("/v1/plan", json={"tp": 4, "pp": 1})
        assert refused.status_code == 400 and "device" in refused.json()["error"]["message"]
