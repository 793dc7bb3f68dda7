"""Memory of a running rempd, sampled again and again: host RSS of the daemon and its workers, device memory (NVML)
and the daemon's /dev/shm segments; growth between the first and the last third of the samples is a leak."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import psutil

# Growth allowed between the first and last third of the memory samples, all taken at the start topology:
# the allocator may keep a few freed blocks and the OS page cache moves RSS by a few MiB; a leak of one KV pool
# or one shard per switch would be tens of MiB (tiny CPU model) to GBs (7B on GPU) over 30-200 switches.
RSS_TOLERANCE = (0.05, 48 << 20)  # (share, bytes): the larger applies
DEVICE_TOLERANCE = (0.02, 256 << 20)
SHM_TOLERANCE = (0.0, 0)  # the weight store is one fixed-size segment: any growth is a leak


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
