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
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ensure_checkpoint  # noqa: E402
from load import wait_healthy  # noqa: E402
from switch_matrix import control, parse, start_daemon, switch  # noqa: E402

CANDIDATES = ["TP1PP1", "TP2PP1", "TP1PP2", "TP4PP1", "TP2PP2", "TP1PP4"]
# Growth allowed between the first and last third of the memory samples, all taken at the start topology:
# the allocator may keep a few freed blocks and the OS page cache moves RSS by a few MiB; a leak of one KV pool
# or one shard per switch would be tens of MiB (tiny CPU model) to GBs (7B on GPU) over 30-200 switches.
RSS_TOLERANCE = (0.05, 48 << 20)  # (share, bytes): the larger applies
DEVICE_TOLERANCE = (0.02, 256 << 20)
SHM_TOLERANCE = (0.0, 0)  # the weight store is one fixed-size segment: any growth is a leak


@dataclass
class Request:
    index: int
    prompt: str
    max_tokens: int
    seed: int | None  # None: greedy

    @property
    def temperature(self) -> float:
        return 0.0 if self.seed is None else 0.8


def workload(count: int, short: int, long: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while rivers run to the sea".split()
    requests = []
    for i in range(count):
        length = rng.choice([2, 8, 40])  # prompt words: short, medium, long (prefill chunks and several blocks)
        prompt = f"Request {i}: " + " ".join(rng.choice(words) for _ in range(length))
        requests.append(Request(i, prompt, rng.choice([short, long]), None if i % 2 == 0 else 1000 + i))
    return requests


async def complete(client, model: str, request: Request) -> str:
    """One streamed completion through the official openai client, or through httpx where the openai package
    is not installed (the GPU machines carry only the wheels they need); both parse the same SSE."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "stream": True, "ignore_eos": True}
    if request.seed is not None:
        body["seed"] = request.seed
    text, reason = [], None
    if isinstance(client, httpx.AsyncClient):
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']}")
                    text.append(event["choices"][0]["text"])
                    reason = event["choices"][0]["finish_reason"] or reason
    else:
        extra = {k: body[k] for k in ("ignore_eos", "seed") if k in body}
        stream = await client.completions.create(model=model, prompt=request.prompt, max_tokens=request.max_tokens,
                                                 temperature=request.temperature, stream=True, extra_body=extra)
        async for event in stream:
            text.append(event.choices[0].text)
            reason = event.choices[0].finish_reason or reason
    if reason != "length":
        raise RuntimeError(f"request {request.index} ended with {reason!r}")
    return "".join(text)


def make_client(url: str, concurrency: int):
    try:
        from openai import AsyncOpenAI
    except ImportError:
        return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4))
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def memory_sample(pid: int, devices: list[int]) -> dict:
    daemon = psutil.Process(pid)
    procs = [daemon, *daemon.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in procs if p.is_running())
    shm = sum(f.stat().st_size for f in Path("/dev/shm").glob(f"remp-*-{pid}-*"))
    sample = {"t": time.time(), "rss": rss, "shm": shm, "processes": len(procs)}
    if devices:
        import pynvml

        pynvml.nvmlInit()
        sample["device"] = sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(d)).used
                               for d in devices)
    return sample


def growth(samples: list[dict], key: str, tolerance: tuple[float, int]) -> dict:
    third = max(1, len(samples) // 3)
    first = statistics.median(s[key] for s in samples[:third])
    last = statistics.median(s[key] for s in samples[-third:])
    allowed = max(tolerance[0] * first, tolerance[1])
    return {"first": first, "last": last, "growth": last - first, "allowed": allowed, "ok": last - first <= allowed}


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
                errors.append(f"request {request.index} (seed {request.seed}) differs from its no-switch output")

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
                                                             "requests_live", "requests_preempted")})
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
            "errors": errors[:10], "switch_errors": [r for r in reports if r["state"] != "committed"][:5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            daemon = start_daemon(model, args.devices, args.start, port, socket_path, [], Path(tmp) / "rempd.log")
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
    result |= {"shape": args.shape, "devices": args.devices, "start": args.start}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
