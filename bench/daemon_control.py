"""The rempd a benchmark drives: started as a subprocess, reached through its control socket, switched by name."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cli import device_count


def parse(name: str) -> tuple[int, int]:
    """"TP2PP2" (any case) → (2, 2)."""
    tp, pp = name.upper().removeprefix("TP").split("PP")
    return int(tp), int(pp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model: Path, devices: str, topology: str, port: int, socket_path: str, extra: list[str],
                 log_path: Path) -> subprocess.Popen:
    """`rempd serve` on `devices` (CUDA ids, or "cpu[:N]" CPU workers) at `topology`; its output goes to
    `log_path`."""
    tp, pp = parse(topology)
    flags = ["--cpu-workers", str(device_count(devices))] if devices.startswith("cpu") else ["--devices", devices]
    cmd = [sys.executable, "-m", "rempd", "serve", "--model", str(model), *flags, "--tp", str(tp), "--pp", str(pp),
           "--port", str(port), "--socket", socket_path, *extra]
    return subprocess.Popen(cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


def control(socket_path: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://rempd", timeout=600)


def switch(ctl: httpx.Client, topology: str, mode: str = "stop_the_world", poll_s: float = 0.02) -> dict:
    """Switch to `topology` and wait for its end; the final report, or state "refused" with the daemon's reason."""
    tp, pp = parse(topology)
    response = ctl.post("/v1/switch", json={"tp": tp, "pp": pp, "mode": mode})
    if response.status_code >= 400:
        return {"state": "refused", "error": response.json().get("error", {}).get("message")}
    while (report := ctl.get(f"/v1/switches/{response.json()['id']}").json())["state"] == "running":
        time.sleep(poll_s)
    return report
