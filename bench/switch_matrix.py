"""Switch matrix: every ordered pair of topologies under live streaming load, beside a restart of the same model.

python bench/switch_matrix.py --shape llama2-7b --devices 0,1,2,3 --out bench/results/switch_matrix_llama2-7b.json
8 GPUs (topologies default to TP1PP8, TP2PP4, TP4PP2, TP8PP1): --devices 0,1,2,3,4,5,6,7
CPU smoke run on 8 workers: --shape tiny-llama8 --devices cpu:8 --clients 4 --max-tokens 96 --restart-topologies TP8PP1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import add_matrix_args, ensure_checkpoint, matrix_topologies  # noqa: E402
from daemon_control import control, parse, start_daemon, switch  # noqa: E402
from load import Stream, serving_pause, stream_completion, wait_healthy  # noqa: E402

TOPOLOGIES = ["TP1PP4", "TP2PP2", "TP4PP1", "TP1PP2", "TP2PP1"]  # on 4 devices, unless --topologies


async def measure_switch(base: str, model: str, ctl: httpx.Client, target: str, clients: int,
                         max_tokens: int, warm_s: float) -> dict:
    """Start `clients` streams, switch once every stream has produced and `warm_s` has passed, let them finish."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as http:
        prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 4) for i in range(clients)]
        live = [Stream(p) for p in prompts]
        tasks = [asyncio.create_task(stream_completion(http, base, model, s.prompt, max_tokens, stream=s))
                 for s in live]
        begin = time.perf_counter()
        # switch once every stream is under way (a stream's first chunk may carry several tokens: the
        # detokenizer holds back incomplete UTF-8), while max_tokens keeps them all going through the switch
        while time.perf_counter() - begin < 300 and not (
                (all(s.token_times for s in live) and time.perf_counter() - begin >= warm_s)
                or any(t.done() for t in tasks)):
            await asyncio.sleep(0.005)
        start = time.perf_counter()
        report = await asyncio.to_thread(switch, ctl, target)
        end = time.perf_counter()
        streams = await asyncio.gather(*tasks)
    if "id" in report:  # read it again: the daemon closes its serving pause at the first token after the switch
        report = ctl.get(f"/v1/switches/{report['id']}").json()
    report["server_pause_s"] = report.get("serving_pause_s")  # the daemon's own gap between tokens
    report["serving_pause_s"] = serving_pause(streams, start, end)
    report["wall_s"] = end - start
    report["failed_requests"] = sum(1 for s in streams if s.error or s.finish_reason != "length")
    report["errors"] = sorted({s.error for s in streams if s.error})[:3]
    report["chunks_per_stream"] = [len(s.token_times) for s in streams]
    return report


async def restart_time(model: Path, devices: str, topology: str, port: int, name: str, log_path: Path) -> float:
    """A fresh rempd serve at `topology` until its first streamed token."""
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        proc = start_daemon(model, devices, topology, port, f"{tmp}/r.sock", [], log_path)
        try:
            await wait_healthy(f"http://127.0.0.1:{port}", 900)
            async with httpx.AsyncClient() as http:
                stream = await stream_completion(http, f"http://127.0.0.1:{port}", name, "Hello", 2)
            return stream.token_times[0] - begin
        finally:
            proc.terminate()
            proc.wait(120)


async def run_matrix(model: Path, shape: str, devices: str, topologies: list[str], args, log_path: Path,
                     results: dict) -> None:
    results["cells"] = []
    port = 18000
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/rempd.sock"
        extra = ["--switch-in-place", args.in_place] if args.in_place else []
        daemon = start_daemon(model, devices, topologies[0], port, sock, extra, log_path)
        try:
            results["startup_s"] = await wait_healthy(f"http://127.0.0.1:{port}", 1800)
            ctl = control(sock)
            results["links"] = ctl.post("/v1/plan", json={"tp": 1, "pp": 1}).json().get("links")
            for src, dst in cell_order(topologies):
                results["cells"].append(await run_cell(ctl, port, shape, src, dst, args))
                Path(args.out).write_text(json.dumps(results, indent=1))  # a cut-short run keeps its cells
        finally:
            daemon.terminate()
            daemon.wait(120)


def cell_order(topologies: list[str]) -> list[tuple[str, str]]:
    """Every ordered pair once, each starting where the one before ended (an Euler circuit of the complete
    directed graph, from the first topology): no switch is spent getting to a cell's source."""
    left = {t: [u for u in topologies if u != t] for t in topologies}
    stack, circuit = [topologies[0]], []
    while stack:
        if left[stack[-1]]:
            stack.append(left[stack[-1]].pop())
        else:
            circuit.append(stack.pop())
    circuit.reverse()
    return list(zip(circuit, circuit[1:]))


async def run_cell(ctl: httpx.Client, port: int, shape: str, src: str, dst: str, args) -> dict:
    source = dict(zip(("tp", "pp"), parse(src)))
    setup = {}
    if ctl.get("/v1/status").json()["topology"] != source:  # only after a cell that did not commit
        setup = await asyncio.to_thread(switch, ctl, src)
    if ctl.get("/v1/status").json()["topology"] != source:
        return {"source": src, "target": dst, "state": "source_unfit", "error": setup.get("error")}
    response = ctl.post("/v1/plan", json=dict(zip(("tp", "pp"), parse(dst))))
    if response.status_code != 200:
        return {"source": src, "target": dst, "state": "refused", "error": response.json()["error"]["message"]}
    runs = []
    for _ in range(args.repeats):
        if runs:  # back to the source for the next repeat
            await asyncio.to_thread(switch, ctl, src)
        runs.append(await measure_switch(f"http://127.0.0.1:{port}", shape, ctl, dst, args.clients,
                                         args.max_tokens, args.warm_s))
    totals = [r["total_seconds"] for r in runs if r["state"] == "committed"]
    cell = {"source": src, "target": dst, "plan": response.json(), "runs": runs, "state": runs[-1]["state"],
            "median_total_s": statistics.median(totals) if totals else None,
            "median_pause_s": statistics.median(r["serving_pause_s"] for r in runs),
            "median_predicted_s": statistics.median(r["predicted"].get("total", 0.0) for r in runs),
            "live_at_cut": min(r.get("requests_live", 0) for r in runs)}
    last = runs[-1]
    print(f"{src:>7} → {dst:<7} {cell['state']:<10} total {cell['median_total_s']} predicted "
          f"{cell['median_predicted_s']:.3f} pause {cell['median_pause_s']} live {cell['live_at_cut']} "
          f"in_place {last.get('in_place')} phases {({k: round(v, 3) for k, v in last.get('phases', {}).items()})} "
          f"detail {({k: round(v, 3) for k, v in last.get('transform_detail', {}).items()})} "
          f"failed {last['failed_requests']} {last['errors']} {last.get('error')}", flush=True)
    return cell


async def main() -> None:
    ap = argparse.ArgumentParser()
    add_matrix_args(ap, max_tokens=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warm-s", type=float, default=0.3, help="seconds of streaming before each switch")
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--restart-only", action="store_true")
    ap.add_argument("--restart-topologies", help="restart into these targets only (default: every topology)")
    ap.add_argument("--in-place", choices=["auto", "always", "never"],
                    help="rempd's --switch-in-place (layer-ordered transforms); its default if unset")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = ensure_checkpoint(args.checkpoints, args.shape)
    topologies = matrix_topologies(args, TOPOLOGIES)
    out = Path(args.out)
    log_path = out.with_suffix(".log")
    results: dict = {"shape": args.shape, "devices": args.devices, "topologies": topologies, "restarts": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.restart_only:
        await run_matrix(model, args.shape, args.devices, topologies, args, log_path, results)
    if not args.no_restart:
        for topology in args.restart_topologies.split(",") if args.restart_topologies else topologies:
            try:
                seconds = await restart_time(model, args.devices, topology, 18001, args.shape, log_path)
            except Exception as exc:  # noqa: BLE001 - a topology that cannot start is recorded as such
                seconds = None
                print(f"restart {topology}: {exc}", flush=True)
            results["restarts"][topology] = seconds
            out.write_text(json.dumps(results, indent=1))
            print(f"restart {topology}: {seconds}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
