"""Predict a switch's phase times from the plan's bytes, link speeds measured at start-up, and costs learned from
the switches measured since (the start-up calibration's two among them). No torch."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.migrate.plan import SwitchPlan

# each committed switch moves a learned cost this share of the way to what it measured: the costs are learned per
# phase and per pool regime, so they hold still, and averaging over a few switches damps their noise
LEARNING_RATE = 0.3


@dataclass
class Price:
    """What a prediction priced from the plan, kept with its report so that the switch, once measured, teaches
    each learned cost of LinkSpeeds from its own phase and regime."""
    moved_seconds: float  # bytes over the links by the slowest worker, and the layer steps
    fresh_pool: bool  # the KV pool is freed and allocated anew
    workers_leave: bool  # workers of the old placement are not in the new one: they free their memory
    graph_layers: int  # layers × batch buckets of decode graphs the commit captures
    new_groups: int  # communication groups built


@dataclass
class LinkSpeeds:
    host_gbps: float  # weight store → one worker's device, GB/s
    peer_gbps: float  # worker → worker over the world group, GB/s
    local_gbps: float  # copy within one device, GB/s
    group_seconds: float = 0.0  # building one new communication group
    rpc_seconds: float = 0.0  # one driver → all workers round trip
    graph_seconds_per_layer: float = 0.0  # capturing one batch bucket's decode CUDA graph, per layer of the stage
    # a step of a layer-ordered transform beyond its bytes: one batched transfer waited for, and on CUDA a device
    # wait and the freed memory handed back
    step_seconds: float = 0.0
    # learned: calibrated at start-up by two switches onto the placement in use, refined by every committed one
    # the plan phase (asking the workers what fits, behind the step they run) and quiescing (the steps in flight)
    plan_seconds: float = 0.0
    quiesce_seconds: float = 0.0
    # what a transform that keeps the KV pool costs beyond moving bytes (Python, building the stage)
    fixed_seconds: float = 0.0
    # beyond fixed_seconds, a transform that frees the pool and the old weights and allocates a new pool: one price
    # per switch, as that costs about as much for a 30 GB pool as for a 60 GB one (4× H100). A shared residual
    # swung between this regime and the kept pool's, 2-4× apart, mispredicting both
    fresh_pool_seconds: float = 0.0
    # beyond fixed_seconds, a kept-pool switch that workers leave, freeing their pool and weights (none at start-up)
    leave_seconds: float = 0.0

    def learn(self, price: Price, measured: dict[str, float], graph_capture: float | None = None,
              rate: float = LEARNING_RATE) -> None:
        """Fold in a committed switch's measured phases and seconds of graph capture: each learned cost moves
        `rate` of the way (1: all of it) toward what its own phase measured."""
        def blend(old: float, seen: float) -> float:
            return max(0.0, old + rate * (seen - old))

        self.plan_seconds = blend(self.plan_seconds, measured.get("plan", 0.0))
        self.quiesce_seconds = blend(self.quiesce_seconds, measured.get("quiesce", 0.0))
        beyond = measured.get("transform", 0.0) - self.rpc_seconds - price.moved_seconds
        if price.fresh_pool:
            self.fresh_pool_seconds = blend(self.fresh_pool_seconds, beyond - self.fixed_seconds)
        elif price.workers_leave:
            self.leave_seconds = blend(self.leave_seconds, beyond - self.fixed_seconds)
        else:
            self.fixed_seconds = blend(self.fixed_seconds, beyond)
        if graph_capture is not None and price.graph_layers:
            self.graph_seconds_per_layer = blend(self.graph_seconds_per_layer, graph_capture / price.graph_layers)

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


def price(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 0, fresh_pool: bool = False,
          graph_buckets: int = 0) -> Price:
    """fresh_pool: the transform frees the KV pool and allocates a new one; graph_buckets: decode-graph buckets the
    commit captures (those of the live batch)."""
    gb = 1e9
    moved = 0.0
    for bytes_in in per_worker_bytes(plan).values():
        # host loads and peer transfers run at once; local copies follow on the same device
        overlapped = max(bytes_in["host"] / (links.host_gbps * gb), bytes_in["peer"] / (links.peer_gbps * gb))
        moved = max(moved, overlapped + bytes_in["stay"] / (links.local_gbps * gb))
    if plan.in_place:
        moved += len(plan.layer_steps) * links.step_seconds
    leave = bool(set(plan.old.workers) - set(plan.new.workers))
    return Price(moved, fresh_pool, leave, plan.new_stage_layers * graph_buckets, new_groups)


def phases_of(price: Price, links: LinkSpeeds) -> dict[str, float]:
    """Seconds per phase, and their total, for what `price` priced at the links' learned costs."""
    rpc = links.rpc_seconds
    pool = links.fresh_pool_seconds if price.fresh_pool else links.leave_seconds if price.workers_leave else 0.0
    phases = {
        "plan": max(rpc, links.plan_seconds),
        "quiesce": max(rpc, links.quiesce_seconds),
        "groups": rpc + price.new_groups * links.group_seconds,
        "transform": rpc + price.moved_seconds + links.fixed_seconds + pool,
        "commit": rpc + links.graph_seconds_per_layer * price.graph_layers,
        "resume": 0.0,
    }
    phases["total"] = sum(phases.values())
    return phases


def predict(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 0, fresh_pool: bool = False,
            graph_buckets: int = 0) -> dict[str, float]:
    return phases_of(price(plan, links, new_groups, fresh_pool, graph_buckets), links)


def plan_summary(plan: SwitchPlan, links: LinkSpeeds, new_groups: int = 0, fresh_pool: bool = False,
                 graph_buckets: int = 0) -> dict:
    """What `rempctl plan` shows: the placement, bytes by source, and predicted seconds per phase."""
    return {
        "source": str(plan.old), "target": str(plan.new), "placement": list(plan.new.workers),
        "tp": plan.new.topology.tp, "pp": plan.new.topology.pp, "in_place": plan.in_place,
        "bytes_by_source": plan.bytes_by_source, "kv_blocks": plan.num_live_blocks,
        "predicted": predict(plan, links, new_groups, fresh_pool, graph_buckets), "links": links.to_dict(),
    }
