"""Predict a switch's phase times from the plan's bytes and link speeds measured at start-up. No torch."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.migrate.plan import SwitchPlan
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.topology import kv_heads_per_rank


@dataclass
class LinkSpeeds:
    host_gbps: float  # weight store → one worker's device, GB/s
    peer_gbps: float  # worker → worker over the world group, GB/s
    local_gbps: float  # copy within one device, GB/s
    group_seconds: float = 0.0  # building one new communication group
    rpc_seconds: float = 0.0  # one driver → all workers round trip
    # a switch that cannot keep the KV pool frees it and the old weights and allocates a new one: priced as
    # 2 × pool bytes / alloc_gbps, calibrated at start-up by such a switch (0: not priced)
    alloc_gbps: float = 0.0
    # what a switch costs beyond moving bytes (Python, freeing memory, building the stage), measured by a
    # switch onto the same placement at start-up and refined by every committed switch
    fixed_seconds: float = 0.0
    graph_seconds_per_layer: float = 0.0  # capturing one batch bucket's decode CUDA graph, per layer of the stage
    # a step of a layer-ordered transform beyond its bytes: one batched transfer waited for, and on CUDA a device
    # wait and the freed memory handed back
    step_seconds: float = 0.0

    def learn(self, residual_seconds: float) -> None:
        """Fold in (measured − predicted) of a committed switch; halves the weight of older ones."""
        self.fixed_seconds = max(0.0, self.fixed_seconds + 0.5 * residual_seconds)

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


def pool_bytes(geo: ModelGeometry, plan: SwitchPlan, num_blocks: int, block_size: int) -> int:
    """The largest KV pool one worker of the new placement allocates."""
    cfg, largest = geo.cfg, 0
    for worker in plan.new.workers:
        shard = shard_of(cfg, plan.new, worker)
        heads = kv_heads_per_rank(cfg.num_kv_heads, shard.tp)
        largest = max(largest, num_blocks * len(shard.layers) * heads * geo.kv_bytes_per_block_head_layer(block_size))
    return largest


def predict(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 0, new_pool_bytes: int = 0,
            graph_buckets: int = 0) -> dict[str, float]:
    """graph_buckets: decode-graph buckets the commit captures (those of the live batch)."""
    gb = 1e9
    transform = 0.0
    for moved in per_worker_bytes(plan).values():
        # host loads and peer transfers run at once; local copies follow on the same device
        overlapped = max(moved["host"] / (links.host_gbps * gb), moved["peer"] / (links.peer_gbps * gb))
        transform = max(transform, overlapped + moved["stay"] / (links.local_gbps * gb))
    if links.alloc_gbps:
        transform += 2 * new_pool_bytes / (links.alloc_gbps * gb)
    if plan.in_place:
        transform += len(plan.layer_steps) * links.step_seconds
    phases = {
        "plan": links.rpc_seconds,
        "quiesce": links.rpc_seconds,
        "groups": links.rpc_seconds + new_groups * links.group_seconds,
        "transform": links.rpc_seconds + transform + links.fixed_seconds,
        "commit": links.rpc_seconds + links.graph_seconds_per_layer * plan.new_stage_layers * graph_buckets,
        "resume": 0.0,
    }
    phases["total"] = sum(phases.values())
    return phases


def plan_summary(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 0, new_pool_bytes: int = 0,
                 graph_buckets: int = 0) -> dict:
    """What `rempctl plan` shows: the placement, bytes by source, and predicted seconds per phase."""
    return {
        "source": str(plan.old), "target": str(plan.new), "placement": list(plan.new.workers),
        "tp": plan.new.topology.tp, "pp": plan.new.topology.pp, "in_place": plan.in_place,
        "bytes_by_source": plan.bytes_by_source, "kv_blocks": plan.num_live_blocks,
        "predicted": predict(plan, links, new_groups, new_pool_bytes, graph_buckets), "links": links.to_dict(),
    }
