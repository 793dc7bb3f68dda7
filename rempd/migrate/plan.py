"""Plan a switch: choose where the new shards go, and list every weight and KV move. Pure: no side effects."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from rempd.migrate.shards import ModelGeometry, Shard, shard_of
from rempd.topology import Placement, Topology, stage_layers


@dataclass(frozen=True)
class WeightPiece:
    """Rows [start, stop) of a stored tensor that `dst` needs, from worker `src` (itself: stays) or the host."""
    name: str
    start: int
    stop: int
    dst: int
    src: int | None  # None: the host weight store
    nbytes: int

    @property
    def source(self) -> str:
        return "host" if self.src is None else ("stay" if self.src == self.dst else "peer")


@dataclass(frozen=True)
class KVPiece:
    """K and V of `layers` × kv `heads` for every live block, from old worker `src` to new worker `dst`."""
    src: int
    dst: int
    layers: range
    heads: range

    @property
    def source(self) -> str:
        return "stay" if self.src == self.dst else "peer"


@dataclass
class SwitchPlan:
    old: Placement
    new: Placement
    weights: list[WeightPiece]
    kv: list[KVPiece]
    num_live_blocks: int
    kv_bytes_per_piece_unit: int  # bytes of one layer × one head × one block (K and V)
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    num_layers: int = 0  # the model's, for pricing work per layer of the new stages
    # units built in each step when the transform runs in layer order (migrate/layer_steps.py); None: plain order
    layer_steps: list[list[int]] | None = None

    @property
    def in_place(self) -> bool:
        return self.layer_steps is not None

    @property
    def new_stage_layers(self) -> int:
        """Layers of the largest stage of the new topology."""
        return max(len(r) for r in stage_layers(self.num_layers, self.new.topology.pp)) if self.num_layers else 0

    def kv_bytes(self, piece: KVPiece) -> int:
        return len(piece.layers) * len(piece.heads) * self.num_live_blocks * self.kv_bytes_per_piece_unit

    def summarise(self) -> None:
        totals = {f"weights_{s}": 0 for s in ("stay", "peer", "host")} | {"kv_stay": 0, "kv_peer": 0}
        for w in self.weights:
            totals[f"weights_{w.source}"] += w.nbytes
        for k in self.kv:
            totals[f"kv_{k.source}"] += self.kv_bytes(k)
        self.bytes_by_source = totals


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return (start, stop) if start < stop else None


def _stay_bytes(geo: ModelGeometry, old: Shard | None, new: Shard, live_blocks: int, block_size: int,
                held: dict[str, tuple[int, int]], wanted: dict[str, tuple[int, int]]) -> int:
    """What `new` (rows `wanted`) would keep if it ran where `old` (rows `held`) runs now: weights plus live KV."""
    if old is None:
        return 0
    total = 0
    for name, rows in wanted.items():
        common = overlap(rows, held[name]) if name in held else None
        if common:
            total += (common[1] - common[0]) * geo.row_bytes[name]
    layers = range(max(old.layers.start, new.layers.start), min(old.layers.stop, new.layers.stop))
    heads = range(max(geo.kv_heads(old).start, geo.kv_heads(new).start),
                  min(geo.kv_heads(old).stop, geo.kv_heads(new).stop))
    if len(layers) > 0 and len(heads) > 0:
        total += len(layers) * len(heads) * live_blocks * geo.kv_bytes_per_block_head_layer(block_size)
    return total


def choose_placement(geo: ModelGeometry, old: Placement, target: Topology, num_devices: int,
                     live_blocks: int, block_size: int) -> Placement:
    """Assign the target's shards to devices so that the most bytes stay where they are (Kuhn–Munkres)."""
    default = Placement.default(target)
    slots = [shard_of(geo.cfg, default, w) for w in default.workers]
    olds = [shard_of(geo.cfg, old, device) for device in range(num_devices)]
    held = [geo.holdings(s) if s else {} for s in olds]
    gain = np.zeros((len(slots), num_devices))
    for i, slot in enumerate(slots):
        wanted = geo.holdings(slot)
        for device in range(num_devices):
            gain[i, device] = _stay_bytes(geo, olds[device], slot, live_blocks, block_size, held[device], wanted)
    # ties go to the lower device index, so an idle switch is stable and predictable
    gain -= np.arange(num_devices)[None, :] * 1e-9 * max(1.0, gain.max())
    rows, cols = linear_sum_assignment(gain, maximize=True)
    workers = [0] * len(slots)
    for slot_index, device in zip(rows, cols):
        workers[slot_index] = int(device)
    return Placement(target, tuple(workers))


def _weight_pieces(geo: ModelGeometry, old: Placement, new: Placement) -> list[WeightPiece]:
    old_holdings = {w: geo.holdings(s) for w in old.workers if (s := shard_of(geo.cfg, old, w))}
    pieces = []
    for dst in new.workers:
        shard = shard_of(geo.cfg, new, dst)
        for name, rows in geo.holdings(shard).items():
            # this worker first, then peers in order; what nobody holds comes from the host store
            sources = [dst] + [w for w in old.workers if w != dst]
            missing = [rows]
            for src in sources:
                held = old_holdings.get(src, {}).get(name)
                if held is None:
                    continue
                still = []
                for gap in missing:
                    common = overlap(gap, held)
                    if common is None:
                        still.append(gap)
                        continue
                    pieces.append(WeightPiece(name, *common, dst, src, (common[1] - common[0]) * geo.row_bytes[name]))
                    still += [r for r in ((gap[0], common[0]), (common[1], gap[1])) if r[0] < r[1]]
                missing = still
            pieces += [WeightPiece(name, a, b, dst, None, (b - a) * geo.row_bytes[name]) for a, b in missing]
    return pieces


def _kv_pieces(geo: ModelGeometry, old: Placement, new: Placement) -> list[KVPiece]:
    pieces = []
    held = [(w, s.layers, geo.kv_heads(s)) for w in old.workers if (s := shard_of(geo.cfg, old, w)) is not None]
    for dst in new.workers:
        want = shard_of(geo.cfg, new, dst)
        want_heads = geo.kv_heads(want)
        for layer in want.layers:
            for head in want_heads:
                # a replicated head is read from one replica: this worker if it has one, else the first
                holders = [w for w, layers, heads in held if layer in layers and head in heads]
                src = dst if dst in holders else holders[0]
                pieces.append(KVPiece(src, dst, range(layer, layer + 1), range(head, head + 1)))
    return _merge_kv(pieces)


def _merge_kv(pieces: list[KVPiece]) -> list[KVPiece]:
    """Fuse single (layer, head) pieces into rectangles per (src, dst): heads first, then layers."""
    by_pair: dict[tuple[int, int], dict[int, list[int]]] = {}
    for p in pieces:
        by_pair.setdefault((p.src, p.dst), {}).setdefault(p.layers.start, []).append(p.heads.start)
    merged = []
    for (src, dst), layers in by_pair.items():
        runs: list[tuple[int, int, tuple[int, int]]] = []  # (first layer, last layer, head range)
        for layer in sorted(layers):
            heads = sorted(layers[layer])
            for a, b in _runs(heads):
                if runs and runs[-1][1] == layer - 1 and runs[-1][2] == (a, b):
                    runs[-1] = (runs[-1][0], layer, (a, b))
                else:
                    runs.append((layer, layer, (a, b)))
        merged += [KVPiece(src, dst, range(l0, l1 + 1), range(*h)) for l0, l1, h in runs]
    return merged


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][1] = v + 1
        else:
            runs.append([v, v + 1])
    return [(a, b) for a, b in runs]


def plan_switch(geo: ModelGeometry, old: Placement, target: Topology | Placement, num_devices: int,
                num_live_blocks: int, block_size: int) -> SwitchPlan:
    new = target if isinstance(target, Placement) else choose_placement(geo, old, target, num_devices,
                                                                         num_live_blocks, block_size)
    plan = SwitchPlan(old, new, _weight_pieces(geo, old, new), _kv_pieces(geo, old, new), num_live_blocks,
                      geo.kv_bytes_per_block_head_layer(block_size), num_layers=geo.cfg.num_layers)
    plan.summarise()
    return plan
