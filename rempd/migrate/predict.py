"""Predict a switch's phase times from the plan's bytes and link speeds measured at start-up. No torch."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.migrate.plan import SwitchPlan


@dataclass
class LinkSpeeds:
    host_gbps: float  # weight store → one worker's device, GB/s
    peer_gbps: float  # worker → worker over the world group, GB/s
    local_gbps: float  # copy within one device, GB/s
    group_seconds: float = 0.0  # building one new communication group
    rpc_seconds: float = 0.0  # one driver → all workers round trip

    def to_dict(self) -> dict:
        return dict(vars(self))


def per_worker_bytes(plan: SwitchPlan) -> dict[int, dict[str, int]]:
    """Bytes each worker receives, by path: host store, peers, and its own device."""
    totals: dict[int, dict[str, int]] = {}
    for piece in plan.weights:
        slot = totals.setdefault(piece.dst, {"host": 0, "peer": 0, "stay": 0})
        slot[piece.source] += piece.nbytes
    for piece in plan.kv:
        slot = totals.setdefault(piece.dst, {"host": 0, "peer": 0, "stay": 0})
        slot[piece.source] += plan.kv_bytes(piece)
    return totals


def predict(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 1) -> dict[str, float]:
    gb = 1e9
    transform = 0.0
    for moved in per_worker_bytes(plan).values():
        # host loads and peer transfers run at once; local copies follow on the same device
        overlapped = max(moved["host"] / (links.host_gbps * gb), moved["peer"] / (links.peer_gbps * gb))
        transform = max(transform, overlapped + moved["stay"] / (links.local_gbps * gb))
    phases = {
        "plan": links.rpc_seconds,
        "quiesce": links.rpc_seconds,
        "groups": links.rpc_seconds + new_groups * links.group_seconds,
        "transform": links.rpc_seconds + transform,
        "commit": links.rpc_seconds,
        "resume": 0.0,
    }
    phases["total"] = sum(phases.values())
    return phases


def plan_summary(plan: SwitchPlan, links: LinkSpeeds) -> dict:
    """What `rempctl plan` shows: the placement, bytes by source, and predicted seconds per phase."""
    return {
        "source": str(plan.old), "target": str(plan.new), "placement": list(plan.new.workers),
        "tp": plan.new.topology.tp, "pp": plan.new.topology.pp,
        "bytes_by_source": plan.bytes_by_source, "kv_blocks": plan.num_live_blocks,
        "predicted": predict(plan, links), "links": links.to_dict(),
    }
