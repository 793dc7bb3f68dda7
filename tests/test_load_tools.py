"""A real load tool (aiperf) against the tiny-model daemon: every request completes, none fails, TTFT is measured.

aiperf is in the `test` extra (no torch of its own, unlike guidellm). It runs fully offline: the tokenizer is the
checkpoint directory, and synthetic prompts are generated from it locally.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUESTS = 16
CONCURRENCY = 4


def tool(name: str) -> Path:
    """The console script installed next to the running interpreter (the venv's own copy)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}; install the test extra: pip install -e '.[test]'")
    return path


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_aiperf_run_completes_with_no_failed_request(checkpoints, start_daemon, tmp_path):
    model = checkpoints["tiny-llama"]
    daemon = start_daemon(model, tp=2, pp=2, workers=4)
    out = tmp_path / "aiperf"
    cmd = [str(tool("aiperf")), "profile",
           "--model", daemon.model_name, "--url", daemon.base_url,
           "--endpoint-type", "chat", "--streaming",
           "--tokenizer", str(model),
           "--synthetic-input-tokens-mean", "16", "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", "16", "--output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true",
           "--concurrency", str(CONCURRENCY), "--request-count", str(REQUESTS),
           "--request-timeout-seconds", "60", "--random-seed", "1",
           "--workers-max", "2", "--record-processors", "1",
           "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none",
           "--artifact-dir", str(out)]
    # Fully offline: the tokenizer is a local directory (aiperf skips Hub look-ups for those), there is no
    # server-metrics or GPU scraping, and HF_ENDPOINT points at a closed local port so that any Hub call would fail
    # at once instead of reaching the network. HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE must NOT be set: aiperf 0.13
    # then resolves even a local directory through snapshot_download and dies with HFValidationError (verified;
    # reference/ecosystem.md §1.2).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"aiperf did not finish in 180 s:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    output = f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert run.returncode == 0, output

    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    assert summary["is_complete"] and not summary["was_cancelled"], output
    assert summary["error_summary"] == [], summary["error_summary"]
    assert summary["request_count"]["avg"] == REQUESTS, summary["request_count"]
    assert summary["completed_request_count"]["avg"] == REQUESTS, summary["completed_request_count"]
    assert summary["request_error_rate"]["avg"] == 0, summary["request_error_rate"]
    assert "error_request_count" not in summary or summary["error_request_count"]["avg"] == 0
    ttft = summary["time_to_first_token"]
    assert ttft["unit"] == "ms" and ttft["count"] == REQUESTS and 0 < ttft["min"] <= ttft["avg"], ttft

    records = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == REQUESTS
    assert not [r for r in records if r.get("error")], [r["error"] for r in records if r.get("error")][:3]
