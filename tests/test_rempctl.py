"""rempctl: light to import, renders what the daemon sends, and maps failures to exit codes."""
import json
import subprocess
import sys
import time

from rich.console import Console
from typer.testing import CliRunner

from rempctl import main as rempctl_main
from rempctl import render
from rempctl.client import DEFAULT_SOCKET, ControlClient, ControlError
from rempd.config import DEFAULT_SOCKET as DAEMON_DEFAULT_SOCKET
from rempd.protocol import API_VERSION, StatusResponse, TopologyInfo, WorkerStatus

GIB = 1 << 30


def test_rempctl_never_imports_torch_and_starts_fast():
    code = "import rempctl.main, sys; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    best = min(_timed([sys.executable, "-c", code]) for _ in range(3))
    assert best < 1.0, f"importing rempctl took {best:.2f} s"
    subprocess.run([sys.executable, "-m", "rempctl", "--help"], check=True, capture_output=True)


def _timed(argv):
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def test_client_and_daemon_agree_on_the_default_socket():
    assert DEFAULT_SOCKET == DAEMON_DEFAULT_SOCKET


def test_client_and_daemon_agree_on_the_phases_of_a_switch():
    # copies, not imports: rempctl loads nothing of rempd but the protocol
    from rempd.migrate import report

    assert (render.PHASES, render.STAGED_PHASES) == (report.PHASES, report.STAGED_PHASES)


def serving_status():
    workers = [WorkerStatus(i, f"cuda:{i}", 1000 + i, "active", i // 2, i % 2, 3 * GIB, 512, 40 * GIB, 80 * GIB, 87.0)
               for i in range(4)]
    workers.append(WorkerStatus(4, "cpu", 2000, "standby", None, None, 0, 0, 300 << 20, 64 * GIB, 0.0))
    workers.append(WorkerStatus(5, "cuda:5", None, "dead", None, None, 0, 0))
    return StatusResponse(API_VERSION, "0.1.0", "serving", 42, 3725.0, model="llama2-7b", max_model_len=4096,
                          topology=TopologyInfo(2, 2), placement=[0, 1, 2, 3], workers=workers, requests_running=3,
                          requests_waiting=1, kv_blocks_used=100, kv_blocks_total=2048, kv_usage=100 / 2048)


def test_status_table_shows_topology_placement_and_every_worker():
    console = Console(record=True, width=140)
    render.print_status(serving_status(), console)
    text = console.export_text()
    for expected in ["serving", "llama2-7b", "TP2·PP2", "up 1h 02m", "[0,1] → [2,3]", "3 running, 1 waiting",
                     "100/2048 blocks (4.9%)", "cuda:3", "1,1", "3.0GiB", "40.0GiB/80.0GiB", "87%", "standby",
                     "300.0MiB/64.0GiB", "dead"]:
        assert expected in text, expected


def test_status_while_starting_shows_progress():
    console = Console(record=True, width=100)
    render.print_status(StatusResponse(API_VERSION, "0.1.0", "starting", 42, 3.0, model="tiny",
                                       progress="loading weights (40%)"), console)
    assert "loading weights (40%)" in console.export_text()


def test_json_output_is_the_protocol(monkeypatch):
    monkeypatch.setattr(ControlClient, "status", lambda self: serving_status())
    result = CliRunner().invoke(rempctl_main.app, ["status", "--json", "--socket", "/nonexistent/s.sock"])
    assert result.exit_code == 0, result.output
    assert StatusResponse.from_dict(json.loads(result.output)) == serving_status()


def test_an_error_answer_exits_1(monkeypatch):
    def fail(self):
        raise ControlError("unexpected answer from rempd: version 2")
    monkeypatch.setattr(ControlClient, "status", fail)
    result = CliRunner().invoke(rempctl_main.app, ["status"])
    assert result.exit_code == 1 and "version 2" in result.output


def test_status_shows_what_the_last_recovery_did_and_lost_devices():
    status = serving_status()
    status.num_recoveries = 1
    status.last_recovery = "TP2PP2 → TP1PP3 after worker 3: died while replying (4.1 s, 09:12:03)"
    status.lost_devices = ["slot 3 (cuda:3): worker 3: CUDA error: unknown error"]
    console = Console(record=True, width=160)
    render.print_status(StatusResponse.from_dict(json.loads(json.dumps(status.to_dict()))), console)
    text = console.export_text()
    assert "recovery   TP2PP2 → TP1PP3 after worker 3" in text and "lost       slot 3 (cuda:3)" in text
