"""Switch soak: continuous streaming load (mixed lengths, greedy and seeded sampling, the official openai client)
while random topology switches run back to back. Passes only with zero failed requests, every output equal to
the same request's output with no switch, and no growth of host RSS (daemon + workers), device memory and the
daemon's /dev/shm segments between the first and the last third of the run.

CPU (CI form):  python bench/soak.py --shape tiny-llama --devices cpu --switches 30
GPU:            python bench/soak.py --shape llama2-7b --devices 0,1,2,3 --switches 200 --out $OUT/soak.json
Against a running daemon: --attach --url http://127.0.0.1:PORT --socket PATH --pid PID --model-name NAME
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ensure_checkpoint  # noqa: E402
from daemon_control import control, free_port, parse, start_daemon, switch  # noqa: E402
from load import wait_healthy  # noqa: E402
from memory_growth import DEVICE_TOLERANCE, RSS_TOLERANCE, SHM_TOLERANCE, growth, memory_sample  # noqa: E402
from soak_load import Request, complete, make_client, workload  # noqa: E402

CANDIDATES = ["TP1PP1", "TP2PP1", "TP1PP2", "TP4PP1", "TP2PP2", "TP1PP4"]


async def run_soak(url: str, socket_path: str, pid: int, model: str, args) -> dict:
    requests = workload(args.requests, args.short_tokens, args.long_tokens)
    client = make_client(url, args.concurrency)
    gate = asyncio.Semaphore(args.concurrency)

    async def limited(request: Request) -> str:
        async with gate:
            return await complete(client, model, request)

    with control(socket_path) as ctl:
        start = ctl.get("/v1/status").json()["topology"]
        home = f"TP{start['tp']}PP{start['pp']}"
        targets = [t for t in CANDIDATES if ctl.post("/v1/plan", json=dict(zip(("tp", "pp"), parse(t)))).status_code
                   == 200]
        begin = time.perf_counter()
        reference = await asyncio.gather(*(limited(r) for r in requests))
        reference_s = time.perf_counter() - begin

        samples = [await asyncio.to_thread(memory_sample, pid, args.device_ids)]
        reports: list[dict] = []
        outcomes = {"ok": 0, "failed": 0, "mismatch": 0}
        errors: list[str] = []
        switching = True

        async def one(request: Request) -> None:
            try:
                text = await limited(request)
            except Exception as exc:  # noqa: BLE001 - counted, and the run fails
                outcomes["failed"] += 1
                errors.append(f"request {request.index}: {exc!r}"[:300])
                return
            same = text == reference[request.index]
            outcomes["ok" if same else "mismatch"] += 1
            if not same:
                expected = reference[request.index]
                at = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
                errors.append(f"request {request.index} (seed {request.seed}) differs from its no-switch output from "
                              f"character {at} of {len(expected)}")

        async def load() -> None:
            passes = 0
            while switching or passes < 1:
                await asyncio.gather(*(one(r) for r in requests))
                passes += 1

        async def switches() -> None:
            nonlocal switching
            rng = random.Random(args.seed)
            current = home
            for n in range(args.switches):
                # every sample_every-th switch returns to the start topology; memory is sampled there, idle
                back = (n + 1) % args.sample_every == 0
                target = home if back and current != home else rng.choice([t for t in targets if t != current])
                report = await asyncio.to_thread(switch, ctl, target)
                reports.append({k: report.get(k) for k in ("id", "state", "target", "error", "total_seconds",
                                                             "requests_live", "requests_preempted",
                                                             "peak_extra_bytes", "priced_extra_bytes",
                                                             "outside_growth_bytes")})
                if report.get("state") == "committed":
                    current = target
                if current == home and back:
                    samples.append(await asyncio.to_thread(memory_sample, pid, args.device_ids))
            if current != home:
                await asyncio.to_thread(switch, ctl, home)
            switching = False

        begin = time.perf_counter()
        await asyncio.gather(load(), switches())
        soak_s = time.perf_counter() - begin
        await asyncio.sleep(1.0)  # the last requests' memory is released
        samples.append(await asyncio.to_thread(memory_sample, pid, args.device_ids))
        final = ctl.get("/v1/status").json()

    checks = {"rss": growth(samples, "rss", RSS_TOLERANCE), "shm": growth(samples, "shm", SHM_TOLERANCE)}
    if args.device_ids:
        checks["device"] = growth(samples, "device", DEVICE_TOLERANCE)
    committed = sum(1 for r in reports if r["state"] == "committed")
    passed = (outcomes["failed"] == 0 and outcomes["mismatch"] == 0 and committed == len(reports)
              and all(c["ok"] for c in checks.values()) and final["num_recoveries"] == 0)
    return {"passed": passed, "client": "httpx" if isinstance(client, httpx.AsyncClient) else "openai",
            "switches": len(reports), "committed": committed, "requests": outcomes,
            "greedy_and_seeded": {"greedy": sum(r.seed is None for r in requests),
                                  "seeded": sum(r.seed is not None for r in requests)},
            "targets": targets, "reference_s": reference_s, "soak_s": soak_s, "memory": checks,
            "memory_samples": len(samples), "recoveries": final["num_recoveries"],
            "preempted": sum(r.get("requests_preempted") or 0 for r in reports),
            "switches_with_live_requests": sum(1 for r in reports if r.get("requests_live")),
            # GPU: how far a transform's measured peak went beyond what plan priced (negative: within it)
            "worst_unpriced_bytes": max((r["peak_extra_bytes"] - r["priced_extra_bytes"] for r in reports
                                         if r.get("peak_extra_bytes") is not None), default=None),
            "worst_outside_growth_bytes": max((r["outside_growth_bytes"] for r in reports
                                               if r.get("outside_growth_bytes") is not None), default=None),
            "errors": errors[:10], "switch_errors": [r for r in reports if r["state"] != "committed"][:5]}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny-llama")
    ap.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "remp-checkpoints"))
    ap.add_argument("--devices", default="cpu", help="cpu (4 CPU workers) or CUDA ids, e.g. 0,1,2,3")
    ap.add_argument("--start", default="TP2PP2", help="start (and home) topology")
    ap.add_argument("--switches", type=int, default=30)
    ap.add_argument("--sample-every", type=int, default=3, help="return home (and sample memory) every N switches")
    ap.add_argument("--requests", type=int, default=16, help="requests per pass of the workload")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", help="the daemon's dtype; greedy tokens are exact across topologies in float32 only "
                                    "(bf16 rounds differently at each TP size)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--attach", action="store_true", help="use a running daemon (--url, --socket, --pid)")
    ap.add_argument("--url")
    ap.add_argument("--socket")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--model-name")
    args = ap.parse_args()
    args.device_ids = [] if args.devices == "cpu" else [int(d) for d in args.devices.split(",")]
    daemon = None
    with tempfile.TemporaryDirectory(prefix="remp-soak-") as tmp:
        if args.attach:
            url, socket_path, pid, name = args.url, args.socket, args.pid, args.model_name
        else:
            model = ensure_checkpoint(args.checkpoints, args.shape)
            port, socket_path, name = free_port(), f"{tmp}/rempd.sock", args.shape
            url = f"http://127.0.0.1:{port}"
            extra = ["--dtype", args.dtype] if args.dtype else []
            daemon = start_daemon(model, args.devices, args.start, port, socket_path, extra, Path(tmp) / "rempd.log")
            pid = daemon.pid
            await wait_healthy(url, 1800)
        try:
            result = await run_soak(url, socket_path, pid, name, args)
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(120)
                if daemon.returncode != 0:
                    print((Path(tmp) / "rempd.log").read_text()[-3000:], file=sys.stderr)
    result |= {"shape": args.shape, "devices": args.devices, "start": args.start, "dtype": args.dtype}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
