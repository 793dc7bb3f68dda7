"""`workload.py crosscheck`: the replayer and aiperf 0.13 at the same fixed Poisson rate and lengths, TTFT side by side.

aiperf gets the model directory as its tokenizer and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE removed from its
environment: with them set, aiperf 0.13 resolves even a local directory as a Hub repo id and fails.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rempd.policy.window import percentile
from replay import Lengths, Phase, replay


def run_aiperf(args, artifacts: Path) -> dict:
    exe = Path(sys.executable).parent / "aiperf"
    cmd = [str(exe if exe.exists() else "aiperf"), "profile", "--model", args.model, "--url", args.url,
           "--endpoint-type", "completions", "--streaming", "--tokenizer", args.tokenizer,
           "--synthetic-input-tokens-mean", str(args.prompt_tokens), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
           "--request-rate", str(args.rate), "--arrival-pattern", "poisson", "--request-count", str(args.requests),
           "--request-timeout-seconds", "300", "--random-seed", str(args.seed), "--workers-max", "2",
           "--record-processors", "1", "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none",
           "--artifact-dir", str(artifacts)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    done = subprocess.run(cmd, cwd=artifacts, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"aiperf failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    ttft = summary["time_to_first_token"]
    scale = {"ms": 1e-3, "s": 1.0, "ns": 1e-9}[ttft.get("unit", "ms")]
    return {"requests": int(ttft["count"]), "errors": len(summary.get("error_summary") or []),
            "ttft_p50": ttft["p50"] * scale, "ttft_p99": ttft["p99"] * scale, "ttft_avg": ttft["avg"] * scale}


def crosscheck(args) -> dict:
    seconds = args.requests / args.rate
    phases = [Phase("fixed", 0.0, seconds, args.rate, args.rate)]
    fixed_prompt, fixed_output = Lengths(args.prompt_tokens, 0.0), Lengths(args.output_tokens, 0.0)
    records = asyncio.run(replay(args.url, args.model, phases, fixed_prompt, fixed_output, args.seed, args.api_key))
    ok = [r.ttft for r in records if r.error is None]
    ours = {"requests": len(records), "errors": len(records) - len(ok), "ttft_p50": percentile(ok, 0.5),
            "ttft_p99": percentile(ok, 0.99), "ttft_avg": sum(ok) / len(ok) if ok else None}
    with tempfile.TemporaryDirectory() as tmp:
        theirs = run_aiperf(args, Path(tmp))
    result = {"rate": args.rate, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
              "replayer": ours, "aiperf": theirs,
              "ttft_p50_ratio": ours["ttft_p50"] / theirs["ttft_p50"] if ours["ttft_p50"] and theirs["ttft_p50"] else None,
              "ttft_avg_ratio": ours["ttft_avg"] / theirs["ttft_avg"] if ours["ttft_avg"] and theirs["ttft_avg"] else None}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result
