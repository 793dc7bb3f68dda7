"""The decode-graph buckets a switch's commit left out, captured while the engine is idle.

A commit captures only the buckets of its live batch, so that its pause stays short; any other bucket would be
captured on its first step, holding every step of its stage meanwhile (30-70 ms on 4x H100 at 7B, ~0.2 s at 70B
TP4), once per new batch size as load ramps up after the switch. The engine loop captures them instead, one per
idle turn, so that a request arriving then waits for one capture at most."""
from __future__ import annotations

from dataclasses import dataclass, field

from rempd.worker_pool.cuda_graphs import bucket_of, buckets_up_to


@dataclass
class GraphBackfill:
    pending: list[int] = field(default_factory=list)  # buckets not captured by the last commit, smallest first
    left_out: list[int] = field(default_factory=list)  # what the last commit left out, pending or not
    backfilled: int = 0  # buckets captured while idle, over the engine's life

    def after_install(self) -> None:
        """An install (start-up, recovery, a rollback) captures every bucket."""
        self.pending, self.left_out = [], []

    def after_commit(self, max_batch: int, live_sizes: list[int]) -> None:
        """The commit captured the buckets of the live batch sizes: every other one waits. Smallest first: at the
        light load that follows a switch, the small ones are needed next."""
        buckets = buckets_up_to(max_batch)
        captured = {bucket_of(n, buckets) for n in live_sizes if n > 0}
        self.pending = [b for b in buckets if b not in captured]
        self.left_out = list(self.pending)

    def next_bucket(self) -> int | None:
        return self.pending[0] if self.pending else None

    def captured(self, bucket: int) -> None:
        self.backfilled += 1  # first: whoever sees nothing pending (another thread) sees the count complete
        self.pending.remove(bucket)
