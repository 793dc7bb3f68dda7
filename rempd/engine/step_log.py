"""Timestamps of the recent steps, one row per step: medians over them cannot be skewed by a first step's kernel
compilation or a switch, as a running mean is. time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for every
process of a host, so a profile can lay the driver's rows and a worker's on one timeline."""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepLog:
    stamps: tuple[str, ...]  # names of a row's perf_counter stamps, in order
    extras: tuple[str, ...] = ()  # names of the values that follow them (batch size, ...)
    window: int = 1024
    rows: deque = field(init=False)

    def __post_init__(self) -> None:
        self.rows = deque(maxlen=self.window)

    def add(self, *row: float) -> None:
        self.rows.append(row)

    def clear(self) -> None:
        self.rows.clear()

    def snapshot(self) -> list[tuple]:
        """The rows, copied in one C call: the API reads them while the engine thread appends (iterating the deque
        itself there raises "deque mutated during iteration")."""
        return list(self.rows)

    def median_ms(self, *spans: tuple[str, str]) -> float:
        """Median over the logged steps of the summed spans (from stamp, to stamp), in milliseconds."""
        rows = self.snapshot()
        if not rows:
            return 0.0
        pairs = [(self.stamps.index(a), self.stamps.index(b)) for a, b in spans]
        return 1e3 * statistics.median(sum(row[b] - row[a] for a, b in pairs) for row in rows)

    def since(self, start: float) -> list[dict[str, float]]:
        """The rows whose first stamp is at or after `start`."""
        return [row for row in self.to_dicts() if row[self.stamps[0]] >= start]

    def to_dicts(self) -> list[dict[str, float]]:
        names = self.stamps + self.extras
        return [dict(zip(names, row)) for row in self.snapshot()]
