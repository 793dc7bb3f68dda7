"""rempctl plan / switch / switches against a real rempd (4 gloo workers on tiny-llama), run as an operator would."""
import json
import time

import pytest
from typer.testing import CliRunner

from rempctl import main as rempctl_main
from rempctl.client import ControlClient

PHASES = ["plan", "quiesce", "groups", "transform", "commit", "resume"]
WIDE = {"COLUMNS": "200"}  # rich wraps tables at 80 columns when stdout is not a terminal


@pytest.fixture(scope="module")
def daemon(faulty_daemon):
    return faulty_daemon


def topology(daemon) -> dict:
    with daemon.control() as ctl:
        return ctl.get("/v1/status").json()["topology"]


def history(daemon) -> list[dict]:
    with daemon.control() as ctl:
        return ctl.get("/v1/switches").json()


def wait_done(daemon, switch_id: str) -> dict:
    with daemon.control() as ctl:
        while (report := ctl.get(f"/v1/switches/{switch_id}").json())["state"] == "running":
            time.sleep(0.02)
    return report


def test_plan_prints_placement_and_predictions_and_changes_nothing(daemon):
    before, switches = topology(daemon), len(history(daemon))
    result = daemon.rempctl("plan", "--tp", "2", "--pp", "2")
    assert result.returncode == 0, result.stderr
    for expected in ["TP2PP2", "placement", "→", "bytes by source", "weights", "KV cache", "stay", "peer", "host",
                     "predicted", "total", *PHASES]:
        assert expected in result.stdout, expected
    assert topology(daemon) == before and len(history(daemon)) == switches


def test_plan_json_is_the_daemons_plan(daemon):
    result = daemon.rempctl("plan", "--tp", "4", "--pp", "1", "--placement", "3,2,1,0", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["tp"], plan["pp"], plan["placement"]) == (4, 1, [3, 2, 1, 0])
    assert set(plan["bytes_by_source"]) >= {"weights_stay", "weights_peer", "weights_host", "kv_stay", "kv_peer"}
    assert set(plan["predicted"]) >= {*PHASES, "total"} and plan["predicted"]["total"] > 0


@pytest.mark.parametrize("command", ["plan", "switch"])
@pytest.mark.parametrize("tp, pp, reason", [(3, 1, "does not divide the 4 attention heads"),
                                            (4, 2, "more than the 4 devices")])
def test_an_invalid_target_exits_1_with_the_reason(daemon, command, tp, pp, reason):
    before, switches = topology(daemon), len(history(daemon))
    result = daemon.rempctl(command, "--tp", str(tp), "--pp", str(pp))
    assert result.returncode == 1 and reason in result.stderr and "refused" in result.stderr
    assert topology(daemon) == before and len(history(daemon)) == switches


def test_switch_commits_and_status_shows_the_new_topology(daemon):
    result = daemon.rempctl("switch", "--tp", "2", "--pp", "2")
    assert result.returncode == 0, result.stderr
    assert "committed" in result.stdout and "measured" in result.stdout and "KV blocks migrated" in result.stdout
    assert topology(daemon) == {"tp": 2, "pp": 2}
    status = daemon.rempctl("status")
    assert status.returncode == 0 and "TP2·PP2" in status.stdout


def test_switch_json_is_the_final_report(daemon):
    result = daemon.rempctl("switch", "--tp", "4", "--pp", "1", "--placement", "1,0,3,2", "--stop-the-world", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # nothing but the JSON on stdout: no progress lines
    assert report["state"] == "committed" and report["placement"] == [1, 0, 3, 2]
    assert list(report["phases"]) == PHASES and report["total_seconds"] > 0
    assert topology(daemon) == {"tp": 4, "pp": 1}


def test_dry_run_prints_the_plan_and_changes_nothing(daemon):
    before, switches = topology(daemon), len(history(daemon))
    table = daemon.rempctl("switch", "--tp", "1", "--pp", "4", "--dry-run")
    as_json = daemon.rempctl("switch", "--tp", "1", "--pp", "4", "--dry-run", "--json")
    assert table.returncode == 0 and "predicted" in table.stdout and "TP1PP4" in table.stdout
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["pp"] == 4
    assert topology(daemon) == before and len(history(daemon)) == switches


def test_no_wait_prints_the_id_and_the_switch_goes_on(daemon):
    result = daemon.rempctl("switch", "--tp", "1", "--pp", "2", "--no-wait")
    assert result.returncode == 0, result.stderr
    assert wait_done(daemon, result.stdout.strip())["state"] == "committed"


def test_a_switch_during_a_switch_exits_1_naming_it(daemon):
    with daemon.control() as ctl:
        first = ctl.post("/v1/switch", json={"tp": 2, "pp": 1, "fault": {"phase": "transform", "kind": "delay"}})
    assert first.status_code == 202
    result = daemon.rempctl("switch", "--tp", "1", "--pp", "1")
    assert result.returncode == 1 and first.json()["id"] in result.stderr and "in progress" in result.stderr
    wait_done(daemon, first.json()["id"])


def inject(monkeypatch, phase: str, kind: str) -> None:
    """Make rempctl's switch request carry a fault (rempctl itself has no such option)."""
    monkeypatch.setattr(ControlClient, "switch", lambda self, target, dry_run=False: self.request(
        "POST", "/v1/switch", {**target, "fault": {"phase": phase, "kind": kind}}))


def test_ctrl_c_while_watching_stops_watching_but_not_the_switch(daemon, monkeypatch):
    inject(monkeypatch, "transform", "delay")

    def interrupted(self, switch_id):
        raise KeyboardInterrupt
    monkeypatch.setattr(ControlClient, "switch_report", interrupted)
    result = CliRunner().invoke(rempctl_main.app, ["switch", "--tp", "2", "--pp", "2", "--socket", daemon.socket])
    assert result.exit_code == 130, result.output
    assert "stopped watching" in result.stderr and "goes on" in result.stderr
    switch_id = history(daemon)[-1]["id"]
    assert switch_id in result.stderr
    assert wait_done(daemon, switch_id)["state"] == "committed"


def test_a_rolled_back_switch_exits_1_with_its_error(daemon, monkeypatch):
    before = topology(daemon)
    inject(monkeypatch, "groups", "raise")
    result = CliRunner().invoke(rempctl_main.app, ["switch", "--tp", "4", "--pp", "1", "--socket", daemon.socket],
                                env=WIDE)
    assert result.exit_code == 1, result.output
    assert "rolled_back" in result.stdout and "error" in result.stdout and "groups" in result.stderr
    assert topology(daemon) == before


def test_switches_lists_the_history(daemon):
    result = daemon.rempctl("switches", "--json")
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["id"] for r in reports] == [r["id"] for r in history(daemon)] and len(reports) >= 5
    assert {r["state"] for r in reports} == {"committed", "rolled_back"}
    table = daemon.rempctl("switches")
    assert table.returncode == 0
    for expected in [reports[0]["id"], reports[-1]["id"], "committed", "rolled_back", "TP2PP2", *PHASES]:
        assert expected in table.stdout, expected
