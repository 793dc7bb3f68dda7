"""What a switch did and where its time went; kept in the daemon's history. No torch."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields

PHASES = ("plan", "quiesce", "groups", "transform", "commit", "resume")
# a staged switch: plan and stage while the old topology serves, then the cut (quiesce, delta, commit, resume)
STAGED_PHASES = ("plan", "give_back", "groups", "stage", "precopy", "quiesce", "delta", "commit", "resume")
MODES = ("staged", "stop_the_world")


@dataclass
class SwitchReport:
    id: str
    source: str  # placement before, e.g. "TP2PP2 on [0,1] → [2,3]"
    target: str  # requested topology
    mode: str = "stop_the_world"  # staged | stop_the_world: how it ran (a staged request may fall back)
    mode_reason: str | None = None  # why a staged request ran stop-the-world
    state: str = "running"  # running | committed | rolled_back | refused | failed
    phase: str | None = None  # the phase now running
    placement: list[int] | None = None  # chosen placement of the target
    phases: dict[str, float] = field(default_factory=dict)  # seconds per finished phase
    predicted: dict[str, float] = field(default_factory=dict)  # plan's prediction, seconds per phase
    priced: dict = field(default_factory=dict)  # what the prediction priced (predict.Price), to learn from
    transform_detail: dict[str, float] = field(default_factory=dict)  # slowest worker's seconds per step
    # seconds of the plan phase spent choosing the placement, and asking the workers what fits (0.04-0.19 s on
    # 4x H100, more than its compute explains on CPU)
    plan_detail: dict[str, float] = field(default_factory=dict)
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    kv_blocks_migrated: int = 0
    requests_preempted: int = 0
    requests_live: int = 0
    in_place: bool | None = None  # the new shards were built layer by layer as the old ones were freed
    kv_pool_kept: bool | None = None  # the pools' memory was viewed in the new shape, not freed and allocated
    # GPU: the most any worker held beyond its old shard during the transform, and what plan priced for it
    peak_extra_bytes: int | None = None
    priced_extra_bytes: int | None = None
    outside_growth_bytes: int | None = None  # GPU: the most a worker's memory outside PyTorch's allocator grew
    # seconds from the last token any request got before the switch to the first one after it (server side), plus
    # the give-back's pause if a staged switch gave KV blocks back
    serving_pause_s: float | None = None
    give_back_pause_s: float | None = None  # staged: the engine did not step while the old pool shrank
    # seconds the engine did not step: the cut of a staged switch; all of a stop-the-world one
    cut_seconds: float | None = None
    staging_seconds: float | None = None  # staged: from the plan to the cut, while the old topology served
    kv_blocks_precopied: int = 0  # staged: blocks whose pre-copy held at the cut
    kv_blocks_delta: int = 0  # staged: blocks sent at the cut
    kv_blocks_given_back: int = 0  # staged: free blocks of the old pool given back so that the target fits
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    total_seconds: float = 0.0

    def add_transform(self, workers: list[dict]) -> None:
        """Fold in the workers' transform reports: the slowest worker's seconds per step, and on GPU the memory of
        the worker where plan's memory model was least safe."""
        for result in workers:
            for name, seconds in result["phases"].items():
                self.transform_detail[name] = max(self.transform_detail.get(name, 0.0), seconds)
        worst = max((r for r in workers if "extra_bytes" in r), default=None,
                    key=lambda r: r["extra_bytes"] - r["predicted_extra_bytes"])
        if worst is not None:
            self.peak_extra_bytes = worst["extra_bytes"]
            self.priced_extra_bytes = worst["predicted_extra_bytes"]
            self.outside_growth_bytes = max(r["outside_growth_bytes"] for r in workers)

    def add_staging(self, kind: str, seconds: list[float]) -> None:
        """Fold in one staging gap's work (staged switches): its slowest worker's host seconds, which the steps
        behind it waited, summed and the most of one gap, per kind."""
        detail, key, slowest = self.transform_detail, f"staging_{kind}", max(seconds)
        detail[key] = detail.get(key, 0.0) + slowest
        detail[f"{key}_max"] = max(detail.get(f"{key}_max", 0.0), slowest)
        if kind == "graphs":
            detail["graph_precapture"] = detail[key]

    def add_stalls(self, steps: list[dict]) -> None:
        """Where a stall between two serving steps sat while staging: waiting for the workers, or on the engine
        thread. steps: the step log's records ("sent", "replied") within the switch."""
        if len(steps) > 1:
            replies = [s["replied"] for s in steps]
            self.transform_detail["staging_longest_reply_gap"] = max(b - a for a, b in zip(replies, replies[1:]))
            self.transform_detail["staging_longest_step_wait"] = max(s["replied"] - s["sent"] for s in steps)

    def to_dict(self) -> dict:
        """A snapshot, taken by the API while the engine thread may still be writing the report: each dict field is
        copied in one C call, which no thread switch can split, before asdict walks the copies (walking the live
        dicts raised "dictionary changed size during iteration", and GET /v1/switches/ID answered 500)."""
        snapshot = copy.copy(self)
        for f in fields(self):
            value = getattr(snapshot, f.name)
            if isinstance(value, dict):
                setattr(snapshot, f.name, value.copy())
        return asdict(snapshot)

    @property
    def done(self) -> bool:
        return self.state != "running"
