"""What each topology can do: latency at a request rate and the highest rate it sustains. No torch.

A profile is measured by a sweep (`rempctl profile`) and refined by what rempd observes while it serves.
Rates are requests per second of the profile's reference shape (prompt_tokens in, output_tokens out);
the policy scales an observed rate to that shape by output tokens. Latencies are 90th percentiles.
Serving below the ceiling only teaches latency: a ceiling is lowered by observed saturation, and raised
only by a new sweep, because a rate that was served well says nothing about where the limit is.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MERGE_BAND = 0.15  # an observation within ±15 % of a point's rate refines that point
MAX_POINTS = 24


@dataclass
class ProfilePoint:
    rate: float  # requests/s served
    ttft: float  # seconds, p90
    itl: float  # seconds, p90
    samples: int = 1
    source: str = "sweep"  # sweep | observed


@dataclass
class TopologyProfile:
    topology: str  # "TP4PP1"
    ceiling: float  # highest request rate it sustains, requests/s
    points: list[ProfilePoint] = field(default_factory=list)

    def predict(self, rate: float) -> tuple[float, float]:
        """(ttft, itl) at `rate`, interpolated between points; infinite above the ceiling. Latency never falls as
        the load rises, so each point counts as at least the worst one at a lighter load: a closed-loop sweep
        point below what was observed at a lighter rate is optimism (4x H100, 7B: TP1PP4's sweep gave 6.9 ms ITL
        at 15.6 req/s where serving showed 21-26 ms at 5-9 req/s; the policy once chose it at 14 req/s, and it
        queued)."""
        if rate > self.ceiling or not self.points:
            return math.inf, math.inf
        pts, ttft, itl = [], 0.0, 0.0
        for p in sorted(self.points, key=lambda p: p.rate):
            ttft, itl = max(ttft, p.ttft), max(itl, p.itl)
            pts.append((p.rate, ttft, itl))
        if rate <= pts[0][0]:
            return pts[0][1], pts[0][2]
        for lo, hi in zip(pts, pts[1:]):
            if rate <= hi[0]:
                f = (rate - lo[0]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 1.0
                return lo[1] + f * (hi[1] - lo[1]), lo[2] + f * (hi[2] - lo[2])
        return pts[-1][1], pts[-1][2]  # between the last measured rate and the ceiling

    def observe(self, rate: float, ttft: float, itl: float, weight: float) -> bool:
        """Fold one observed window in; False when it says nothing (above the ceiling, or no rate)."""
        if not 0 < rate <= self.ceiling or not (math.isfinite(ttft) and math.isfinite(itl)):
            return False
        near = min(self.points, key=lambda p: abs(p.rate - rate), default=None)
        if near is not None and abs(near.rate - rate) <= MERGE_BAND * max(rate, near.rate):
            near.ttft += weight * (ttft - near.ttft)
            near.itl += weight * (itl - near.itl)
            near.samples += 1
            return True
        self.points.append(ProfilePoint(rate, ttft, itl, 1, "observed"))
        if len(self.points) > MAX_POINTS:  # drop the observed point with the fewest samples
            observed = [p for p in self.points if p.source == "observed"]
            self.points.remove(min(observed, key=lambda p: p.samples))
        return True

    def saturated(self, served_rate: float) -> bool:
        """It could not keep up at `served_rate`: that is its ceiling now."""
        if served_rate <= 0 or served_rate >= self.ceiling:
            return False
        self.ceiling = served_rate
        self.points = [p for p in self.points if p.rate <= served_rate]
        return True


@dataclass
class ProfileSet:
    """Profiles of one model on one device set."""
    model: str
    devices: str  # "cuda0-1-2-3" | "cpu4"
    prompt_tokens: int = 128
    output_tokens: int = 128
    topologies: dict[str, TopologyProfile] = field(default_factory=dict)
    updated: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileSet":
        profiles = {name: TopologyProfile(p["topology"], float(p["ceiling"]),
                                          [ProfilePoint(**pt) for pt in p.get("points", [])])
                    for name, p in data.get("topologies", {}).items()}
        return cls(data["model"], data["devices"], int(data.get("prompt_tokens", 128)),
                   int(data.get("output_tokens", 128)), profiles, float(data.get("updated", 0.0)))

    def save(self, path: Path) -> None:
        """Atomically: a crash mid-write must not leave a profile that fails to parse at the next start."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.updated = time.time()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, model: str, devices: str) -> "ProfileSet":
        """The stored profiles, or an empty set when none are stored (or they belong to another model)."""
        try:
            found = cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls(model, devices)
        if (found.model, found.devices) != (model, devices):
            return cls(model, devices)
        return found


def device_key(devices: list[int], cpu_workers: int) -> str:
    return "cuda" + "-".join(map(str, devices)) if devices else f"cpu{cpu_workers}"


def profile_path(state_dir: str | Path, model: str, devices: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model) or "model"
    return Path(state_dir) / "profiles" / f"{safe}--{devices}.json"
