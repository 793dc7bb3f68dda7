"""The switch soak's CI form: bench/soak.py with 30 random switches on tiny-llama (4 CPU workers) under streaming
load. It fails on any failed request, any output unlike its no-switch reference, or memory growth."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from memory_growth import RSS_TOLERANCE, SHM_TOLERANCE, growth  # noqa: E402


def test_thirty_switches_under_load_lose_nothing_and_leak_nothing(checkpoints, tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--checkpoints",
                             str(checkpoints["tiny-llama"].parent), "--shape", "tiny-llama", "--switches", "30",
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["committed"] == 30 and report["client"] == "openai"
    assert report["requests"]["failed"] == 0 and report["requests"]["mismatch"] == 0
    assert report["greedy_and_seeded"]["greedy"] and report["greedy_and_seeded"]["seeded"]
    assert report["switches_with_live_requests"] > 0  # the switches really ran under load


def test_the_growth_check_catches_a_leak():
    mib = 1 << 20
    steady = [{"rss": 2000 * mib + (i % 3) * mib, "shm": 900} for i in range(12)]
    leaking = [{"rss": 2000 * mib + i * 16 * mib, "shm": 900 + (i > 8)} for i in range(12)]
    assert growth(steady, "rss", RSS_TOLERANCE)["ok"] and growth(steady, "shm", SHM_TOLERANCE)["ok"]
    assert not growth(leaking, "rss", RSS_TOLERANCE)["ok"] and not growth(leaking, "shm", SHM_TOLERANCE)["ok"]
