"""Where a worker's switch transform spends its time, and the bytes it moves to and from peers."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class ReshardTimes:
    """Seconds of each step on this worker, and bytes it moved to and from peers."""
    bytes_sent: int = 0
    bytes_received: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class Clock:
    """Per-step seconds of one worker's transform; on CUDA it waits for the device at each mark, so a step's
    time is its own and not that of work queued before it."""

    def __init__(self, times: ReshardTimes, device: torch.device):
        self.times, self.device = times, device
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.phases[name] = self.times.phases.get(name, 0.0) + now - self.last
        self.last = now
