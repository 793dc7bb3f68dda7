"""systemd: the unit passes `systemd-analyze verify` silently, and sd_notify speaks the protocol."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rempd import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "rempd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(apt-get install -y systemd)")


def verify(unit_text: str, directory: Path) -> str:
    """Everything `systemd-analyze verify` prints: it exits 0 on unknown keys and bad values, so output is failure."""
    # ExecStart must name an executable that exists here; the installed path does not on a CI machine.
    executable = re.search(r"^ExecStart=(\S+)", unit_text, re.M).group(1)
    if not os.access(executable, os.X_OK):
        unit_text = unit_text.replace(f"ExecStart={executable}", f"ExecStart={sys.executable}")
    path = directory / "rempd.service"
    path.write_text(unit_text)
    done = subprocess.run([ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip()


@needs_analyze
def test_unit_verifies_without_a_word(tmp_path):
    assert verify(UNIT.read_text(), tmp_path) == ""


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path):
    assert "Typ" in verify(UNIT.read_text().replace("Type=notify", "Typ=notify"), tmp_path)


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_has_what_rempd_relies_on():
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["RuntimeDirectory"] == ["remp"] and s["RuntimeDirectoryMode"] == ["0750"]
    assert s["KillMode"] == ["control-group"]
    assert "/etc/remp/" in s["ExecStart"][0]
    # the GPUs stay reachable: no private /dev, and the NVIDIA character devices are allowed
    assert s.get("PrivateDevices", ["no"]) == ["no"]
    assert {"char-nvidiactl rw", "char-nvidia rw", "char-nvidia-uvm rw"} <= set(s["DeviceAllow"])
    assert "ProtectProc" not in s and "MemoryDenyWriteExecute" not in s


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield lambda: sock.recv(4096).decode()
    sock.close()


def test_notify_messages(notify_socket):
    assert systemd.ready("serving tiny TP2PP1")
    assert notify_socket() == "READY=1\nSTATUS=serving tiny TP2PP1"
    assert systemd.status("loading weights (40%)")
    assert notify_socket() == "STATUS=loading weights (40%)"
    assert systemd.stopping()
    assert notify_socket() == "STOPPING=1"
    assert systemd.reloading("switching to TP4PP1")
    fields = notify_socket().split("\n")
    assert fields[0] == "RELOADING=1" and fields[2] == "STATUS=switching to TP4PP1"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", fields[1])


def test_notify_abstract_socket(monkeypatch):
    name = f"remp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert sock.recv(100) == b"READY=1"


def test_notify_is_a_no_op_without_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.status("x") is False  # a vanished socket is logged, never raised
