"""How much device memory a worker's transform takes beyond the old shard it holds, at its peak: plain (old and
new shards side by side) or in layer order (migrate/layer_steps.py). Plan checks both. Pure: no torch."""
from __future__ import annotations

from dataclasses import replace

from rempd.migrate.layer_steps import Step, free_steps, piece_unit, step_of_units
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.shards import ModelGeometry, shard_of


def kv_bytes(plan: SwitchPlan, me: int) -> tuple[int, int]:
    """(packed, received): live KV this worker packs out of its old pool (every piece it sources), and the KV peers
    send it."""
    packed = sum(plan.kv_bytes(p) for p in plan.kv if p.src == me)
    received = sum(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.dst == me)
    return packed, received


def transform_bytes(plan: SwitchPlan, me: int, new_weight_bytes: int, round_bytes: int) -> int:
    """Plain order: the most this worker allocates while its old shard is still held: the new shard, its packed
    live KV, the KV peers send it (held until the new pool takes it), and the send and receive buffers of at most
    two rounds in flight (weights both ways, the KV it sends)."""
    moved = largest = 0
    for piece in plan.weights:
        if piece.source == "peer" and me in (piece.src, piece.dst):
            moved += piece.nbytes
            largest = max(largest, piece.nbytes)
    for piece in plan.kv:
        if piece.source == "peer" and me in (piece.src, piece.dst):
            largest = max(largest, plan.kv_bytes(piece))
    packed, received = kv_bytes(plan, me)
    sent = sum(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.src == me)
    return new_weight_bytes + packed + received + min(moved + sent, 2 * (round_bytes + largest))


def in_place_bytes(plan: SwitchPlan, geo: ModelGeometry, me: int, steps: list[Step], round_bytes: int) -> int:
    """Layer order: the most this worker allocates beyond its old shard. Peer rows land straight in the new
    tensors, so weights need no transfer buffers; the KV rounds come after the weights, with every received piece
    held until it is installed."""
    old = shard_of(geo.cfg, plan.old, me)
    step_of = step_of_units(steps)
    built, freed, unread = [0] * len(steps), [0] * len(steps), 0
    for piece in plan.weights:
        if piece.dst == me:
            built[step_of[piece_unit(plan, piece)]] += piece.nbytes
    if old is not None:
        for name, step in free_steps(plan, geo, me, steps).items():
            start, stop = geo.rows(old, name)
            if step < 0:
                unread += (stop - start) * geo.row_bytes[name]
            else:
                freed[step] += (stop - start) * geo.row_bytes[name]
    held, peak = -unread, 0  # relative to the old shard
    for k in range(len(steps)):
        held += built[k]
        peak = max(peak, held)
        held -= freed[k]
    packed, received = kv_bytes(plan, me)
    sent = sum(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.src == me)
    largest = max((plan.kv_bytes(p) for p in plan.kv), default=0)
    # several pieces for one peer are concatenated into a send buffer; at most two rounds are in flight
    return packed + max(peak, held + received + min(sent, 2 * (round_bytes + largest)))


def transform_extra(plan: SwitchPlan, geo: ModelGeometry, me: int, round_bytes: int) -> int:
    """Bytes beyond its old shard that this worker needs at the transform's peak, in the plan's order."""
    if plan.layer_steps is not None:
        return in_place_bytes(plan, geo, me, plan.layer_steps, round_bytes)
    shard = shard_of(geo.cfg, plan.new, me)
    return transform_bytes(plan, me, geo.weight_bytes(shard) if shard else 0, round_bytes)


def transform_extras(plan: SwitchPlan, geo: ModelGeometry, me: int, round_bytes: int) -> tuple[int, int]:
    """transform_extra in plain order and in the plan's layer order (plain again when it has none)."""
    plain = transform_extra(replace(plan, layer_steps=None), geo, me, round_bytes)
    return plain, transform_extra(plan, geo, me, round_bytes) if plan.in_place else plain


def headrooms(plan: SwitchPlan, geo: ModelGeometry, me: int, round_bytes: int, room: int) -> tuple[int, int]:
    """What a worker with `room` bytes beyond its old shard has left at the transform's peak (negative: short),
    in plain order and in the plan's layer order."""
    plain, layered = transform_extras(plan, geo, me, round_bytes)
    return room - plain, room - layered
