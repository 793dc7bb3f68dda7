"""What a switch did and where its time went; kept in the daemon's history. No torch."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

PHASES = ("plan", "quiesce", "groups", "transform", "commit", "resume")


@dataclass
class SwitchReport:
    id: str
    source: str  # placement before, e.g. "TP2PP2 on [0,1] → [2,3]"
    target: str  # requested topology
    state: str = "running"  # running | committed | rolled_back | refused | failed
    phase: str | None = None  # the phase now running
    placement: list[int] | None = None  # chosen placement of the target
    phases: dict[str, float] = field(default_factory=dict)  # seconds per finished phase
    predicted: dict[str, float] = field(default_factory=dict)  # plan's prediction, seconds per phase
    transform_detail: dict[str, float] = field(default_factory=dict)  # slowest worker's seconds per step
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    kv_blocks_migrated: int = 0
    requests_preempted: int = 0
    requests_live: int = 0
    # seconds from the last token any request got before the switch to the first one after it (server side)
    serving_pause_s: float | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    total_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.state != "running"
