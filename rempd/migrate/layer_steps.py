"""The steps of a layer-ordered ("in-place") transform. Pure: no torch.

A plain transform builds a worker's whole new shard while its whole old shard is still held. In layer order the
new stages are built a few layers (units) at a time, and a worker frees each of its old tensors right after the
last step that reads it (a copy into its own new shard, or a send to a peer). A worker is the only reader of its
own tensors, so no other worker need be waited for: its sends being done is its peers being done with them.

Ascending layers would not do: a worker whose old layers come last (TP1PP4 → TP4PP1: the last stage) would build
most of its new shard before freeing anything. So each next unit is the one after which no worker is far above
the larger of its two shards (build_order). The order and its steps depend on the plan alone; the driver computes
them once and every worker follows them.
"""
from __future__ import annotations

import numpy as np

from rempd.migrate.plan import SwitchPlan, WeightPiece
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.model.sharding import fused_name, layer_of

EMBED = "model.embed_tokens.weight"
Step = list[int]  # units built in one step, in build order


def unit_of(name: str, first_stage: bool, num_layers: int) -> int:
    """The part of a stage a tensor belongs to: 0 the embedding, 1 + i layer i, num_layers + 1 the final norm and
    LM head. A tied head is the embedding's rows: on a stage that does not embed, it belongs to the head."""
    layer = layer_of(name)
    if layer is not None:
        return layer + 1
    return 0 if name == EMBED and first_stage else num_layers + 1


def piece_unit(plan: SwitchPlan, piece: WeightPiece) -> int:
    """The unit in which the destination builds this piece's rows."""
    return unit_of(piece.name, plan.new.coords(piece.dst)[0] == 0, plan.num_layers)


def old_allocations(plan: SwitchPlan, geo: ModelGeometry,
                    only: int | None = None) -> dict[tuple[int, str], tuple[int, set[int]]]:
    """(old worker, allocation) → its bytes and the units whose building reads it (none: freed before the first
    step), for every old worker or `only` one. Fused tensors (model/sharding.fused_name) are one allocation: freed
    when all of it is read."""
    read_by: dict[tuple[int, str], set[int]] = {}
    for piece in plan.weights:
        if piece.src is not None and only in (None, piece.src):
            read_by.setdefault((piece.src, fused_name(piece.name)), set()).add(piece_unit(plan, piece))
    found: dict[tuple[int, str], tuple[int, set[int]]] = {}
    for worker in plan.old.workers if only is None else [only]:
        shard = shard_of(geo.cfg, plan.old, worker)
        for name, (start, stop) in geo.holdings(shard).items():
            key = (worker, fused_name(name))
            nbytes = found.get(key, (0, set()))[0] + (stop - start) * geo.row_bytes[name]
            found[key] = (nbytes, read_by.get(key, set()))
    return found


def build_order(plan: SwitchPlan, geo: ModelGeometry) -> list[int]:
    """Every unit once, greedily: next the unit after whose build no worker is far above the larger of its old
    and new shards, then the one after whose frees none is, then the one that leaves loads most even; ties to
    the lower unit."""
    workers = sorted(set(plan.old.workers) | set(plan.new.workers))
    column = {w: j for j, w in enumerate(workers)}
    units = plan.num_layers + 2
    built, freed = np.zeros((units, len(workers)), np.int64), np.zeros((units, len(workers)), np.int64)
    for piece in plan.weights:
        built[piece_unit(plan, piece), column[piece.dst]] += piece.nbytes
    held, new = np.zeros(len(workers), np.int64), built.sum(0)
    shared = {}  # allocations read by several units (a tied embedding): freed once the last of them is built
    for (worker, name), (nbytes, units_reading) in old_allocations(plan, geo).items():
        if units_reading:
            held[column[worker]] += nbytes
        if len(units_reading) == 1:
            freed[next(iter(units_reading)), column[worker]] += nbytes
        elif units_reading:
            shared[(column[worker], name)] = (nbytes, set(units_reading))
    bound = np.maximum(held, new)  # each worker's least possible peak: the larger of its two shards
    left, order = list(range(units)), []
    while left:
        after_build = held + built[left]
        after_free = after_build - freed[left]
        # a tie on the worst worker goes to the unit that frees the fuller of the rest
        spread = (after_free.astype(np.float64) ** 2).sum(1)
        pick = np.lexsort((left, spread, (after_free - bound).max(1), (after_build - bound).max(1)))[0]
        unit = left.pop(pick)
        order.append(unit)
        held += built[unit] - freed[unit]
        for key in [key for key, (_, units_reading) in shared.items() if unit in units_reading]:
            nbytes, units_reading = shared[key]
            units_reading.discard(unit)
            if not units_reading:
                held[key[0]] -= nbytes
                del shared[key]
    return order


def layer_steps(plan: SwitchPlan, geo: ModelGeometry, round_bytes: int) -> list[Step]:
    """The build order cut into steps in which no worker builds more than about `round_bytes` of new weights
    (a unit larger than that is a step of its own)."""
    load_of: list[dict[int, int]] = [{} for _ in range(plan.num_layers + 2)]
    for piece in plan.weights:
        per_worker = load_of[piece_unit(plan, piece)]
        per_worker[piece.dst] = per_worker.get(piece.dst, 0) + piece.nbytes
    steps: list[Step] = [[]]
    load: dict[int, int] = {}
    for unit in build_order(plan, geo):
        adds = load_of[unit]
        if steps[-1] and any(load.get(w, 0) + b > round_bytes for w, b in adds.items()):
            steps.append([])
            load = {}
        steps[-1].append(unit)
        for worker, nbytes in adds.items():
            load[worker] = load.get(worker, 0) + nbytes
    return steps


def step_of_units(steps: list[Step]) -> dict[int, int]:
    return {unit: k for k, step in enumerate(steps) for unit in step}


def step_pieces(plan: SwitchPlan, steps: list[Step]) -> list[list[int]]:
    """Indices into plan.weights of each step's peer pieces, in plan order: both ends of a pair walk them alike."""
    step_of = step_of_units(steps)
    pieces: list[list[int]] = [[] for _ in steps]
    for i, piece in enumerate(plan.weights):
        if piece.source == "peer":
            pieces[step_of[piece_unit(plan, piece)]].append(i)
    return pieces


def free_steps(plan: SwitchPlan, geo: ModelGeometry, me: int, steps: list[Step]) -> dict[str, int]:
    """Each old tensor of worker `me` → the step after which it is freed: the last one that reads its allocation;
    -1 (before the first step) when none does."""
    old = shard_of(geo.cfg, plan.old, me)
    if old is None:
        return {}
    step_of = step_of_units(steps)
    allocations = old_allocations(plan, geo, only=me)
    return {name: max((step_of[u] for u in allocations[(me, fused_name(name))][1]), default=-1)
            for name in geo.tensor_names(old)}
