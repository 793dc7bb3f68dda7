"""Staged vs stop-the-world switches under live streaming load, every ordered topology pair, in one daemon run.

For each pair: serving pause (the longest gap between two tokens of any stream across the switch, client side,
and the server's cut), total switch time, and TTFT / inter-token latency of requests while the new topology is
staged, beside the same load on the source topology with no switch.

python bench/staged_matrix.py --shape llama2-7b --devices 0,1,2,3 --out bench/results/staged_matrix_llama2-7b.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import add_matrix_args, ensure_checkpoint, matrix_topologies  # noqa: E402
from load import Stream, serving_pause, stream_completion, wait_healthy  # noqa: E402
from daemon_control import control, start_daemon, switch  # noqa: E402

TOPOLOGIES = ["TP1PP4", "TP2PP2", "TP4PP1"]  # on 4 devices, unless --topologies
POLL_S = 0.005  # how often a switch is polled: when it is seen to end bounds the window measured around it


def percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else None


def latency(streams: list[Stream], probes: list[Stream], window: tuple[float, float] | None) -> dict:
    """ITL of the gaps that end inside `window` (all gaps when None), and TTFT of the probe requests."""
    gaps = [g for s in streams for at, g in s.gaps() if window is None or window[0] <= at + g <= window[1]]
    ttft = [p.ttft for p in probes if p.ttft is not None]
    return {"itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "itl_mean_s": statistics.fmean(gaps) if gaps else None, "gaps": len(gaps),
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_max_s": max(ttft, default=None)}


async def under_load(base: str, model: str, ctl: httpx.Client, target: str | None, mode: str, args) -> dict:
    """`clients` streams; once each has a few tokens, a switch (or none), with `probes` new requests sent as it
    starts, whose TTFT is measured while the new topology is being staged."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.clients + args.probes + 4)) as http:
        live = [Stream(f"Request {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 4))
                for i in range(args.clients)]
        tasks = [asyncio.create_task(stream_completion(http, base, model, s.prompt, args.max_tokens, stream=s))
                 for s in live]
        begin = time.perf_counter()
        while time.perf_counter() - begin < 300 and not (
                all(len(s.token_times) >= 4 for s in live) or any(t.done() for t in tasks)):
            await asyncio.sleep(0.002)
        probes = [Stream(f"Probe {i}: a new request arrives while the switch runs.") for i in range(args.probes)]
        start = time.perf_counter()
        probe_tasks = [asyncio.create_task(stream_completion(http, base, model, p.prompt, 8, stream=p))
                       for p in probes]
        report = await asyncio.to_thread(switch, ctl, target, mode, POLL_S) if target else {}
        end = time.perf_counter()
        streams = await asyncio.gather(*tasks, *probe_tasks)
    if "id" in report:  # again: the daemon closes its serving pause at the first token after the cut
        report = ctl.get(f"/v1/switches/{report['id']}").json()
    report = {k: report.get(k) for k in ("state", "mode", "mode_reason", "error", "phases", "transform_detail",
                                         "total_seconds", "cut_seconds", "staging_seconds", "serving_pause_s",
                                         "requests_live", "kv_pool_kept", "kv_blocks_precopied", "kv_blocks_delta",
                                         "kv_blocks_given_back", "requests_preempted")} if target else {}
    staging = report.get("staging_seconds")
    window = (start, start + staging) if staging else (start, end)
    report["client_pause_s"] = serving_pause(streams[:len(live)], start, end)
    report["while_switching"] = latency(streams[:len(live)], probes, window if target else None)
    report["failed_requests"] = sum(1 for s in streams if s.error or s.finish_reason != "length")
    return report


def stall_detail(report: dict) -> dict:
    """The staged report's figures that place a stall: the longest wait for a step's reply and gap between two
    replies, the background loads, and the slowest step of each staging kind (ms)."""
    detail = report.get("transform_detail") or {}
    keys = ["staging_longest_reply_gap", "staging_longest_step_wait", "staging_loads",
            "staging_loads_start_wait_seconds", "staging_loads_host_seconds", "staging_loads_stay_seconds",
            "give_back_graph_capture",
            *(k for k in detail if k.startswith("staging_") and k.endswith("_max"))]
    out = {k.removeprefix("staging_"): round(1e3 * detail[k]) for k in keys if k in detail}
    if "staging_loads_alloc_retries" in detail:  # a count: each a cache flush, a device-wide sync
        out["loads_alloc_retries"] = int(detail["staging_loads_alloc_retries"])
    return out


def failed(report: dict) -> str:
    """A switch that did not commit, and why: the matrix goes on, so say it on the cell's line."""
    state = report.get("state")
    return "" if state in ("committed", None) else f" [{state}: {(report.get('error') or '')[:160]}]"


async def run(model: Path, args) -> dict:
    results: dict = {"shape": args.shape, "devices": args.devices, "cells": [], "baselines": {}}
    port, base = 18100, "http://127.0.0.1:18100"
    topologies = matrix_topologies(args, TOPOLOGIES)
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/rempd.sock"
        daemon = start_daemon(model, args.devices, topologies[0], port, sock, shlex.split(args.daemon_args),
                              Path(args.out).with_suffix(".log"))
        try:
            results["startup_s"] = await wait_healthy(base, 1800)
            ctl = control(sock)
            for src in topologies:
                if switch(ctl, src, "stop_the_world", POLL_S).get("state") not in ("committed", None):
                    continue
                results["baselines"][src] = await under_load(base, args.shape, ctl, None, "", args)
                for dst in topologies:
                    if dst == src:
                        continue
                    cell = {"source": src, "target": dst}
                    for mode in ("staged", "stop_the_world"):
                        back = switch(ctl, src, "stop_the_world", POLL_S)  # refused: the daemon is at src already
                        if back.get("state") not in ("committed", "refused", None):
                            cell[f"back_to_source_before_{mode}"] = {k: back.get(k) for k in ("state", "error")}
                        cell[mode] = await under_load(base, args.shape, ctl, dst, mode, args)
                    results["cells"].append(cell)
                    s, w = cell["staged"], cell["stop_the_world"]
                    none = results["baselines"][src]["while_switching"]
                    print(f"{src:>7} → {dst:<7} staged[{s.get('mode')}] server pause {s.get('serving_pause_s')} "
                          f"(client {s['client_pause_s']:.3f}) cut {s.get('cut_seconds')} total "
                          f"{s.get('total_seconds')} | stop-the-world server pause {w.get('serving_pause_s')} total "
                          f"{w.get('total_seconds')} | ITL p50/mean while staging {s['while_switching']['itl_p50_s']}"
                          f"/{s['while_switching']['itl_mean_s']} vs none {none['itl_p50_s']}/{none['itl_mean_s']}"
                          f" | where a stall sat: {stall_detail(s)} given back {s.get('kv_blocks_given_back')}"
                          f" {s.get('mode_reason') or ''}{failed(s)}{failed(w)}"
                          + "".join(f" | {k}{failed(v)}" for k, v in cell.items() if k.startswith("back_to")),
                          flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1))
        finally:
            daemon.terminate()
            daemon.wait(120)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    add_matrix_args(ap, max_tokens=128)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--daemon-args", default="", help="more `rempd serve` flags, e.g. --gpu-memory-utilization 0.95")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = ensure_checkpoint(args.checkpoints, args.shape)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(model, args))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
