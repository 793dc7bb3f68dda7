"""Topology (tp × pp), its placement on devices, and the rules that make one valid. No torch."""
from __future__ import annotations

import itertools
from dataclasses import dataclass


class TopologyError(ValueError):
    """A topology this model or this device set cannot run; the message says why."""


@dataclass(frozen=True, order=True)
class Topology:
    tp: int
    pp: int

    @property
    def size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"TP{self.tp}PP{self.pp}"

    @classmethod
    def parse(cls, name: str) -> "Topology":
        """"TP2PP2" (any case) → Topology(2, 2); ValueError for anything else."""
        tp, pp = name.upper().removeprefix("TP").split("PP")
        return cls(int(tp), int(pp))


@dataclass(frozen=True)
class Placement:
    """Which worker (device index in the pool) runs each (pp_rank, tp_rank) shard."""
    topology: Topology
    workers: tuple[int, ...]  # index pp_rank * tp + tp_rank

    def __post_init__(self) -> None:
        if len(self.workers) != self.topology.size or len(set(self.workers)) != len(self.workers):
            raise TopologyError(f"placement {self.workers} does not fit {self.topology}")

    @classmethod
    def default(cls, topology: Topology) -> "Placement":
        return cls(topology, tuple(range(topology.size)))

    def worker(self, pp_rank: int, tp_rank: int) -> int:
        return self.workers[pp_rank * self.topology.tp + tp_rank]

    def coords(self, worker: int) -> tuple[int, int] | None:
        """(pp_rank, tp_rank) of a worker, or None when it stands by."""
        if worker not in self.workers:
            return None
        idx = self.workers.index(worker)
        return divmod(idx, self.topology.tp)

    def tp_group(self, pp_rank: int) -> tuple[int, ...]:
        tp = self.topology.tp
        return self.workers[pp_rank * tp:(pp_rank + 1) * tp]

    @property
    def output_worker(self) -> int:
        """The worker that samples: tp rank 0 of the last stage."""
        return self.worker(self.topology.pp - 1, 0)

    def __str__(self) -> str:
        stages = ["[" + ",".join(map(str, self.tp_group(p))) + "]" for p in range(self.topology.pp)]
        return f"{self.topology} on " + " → ".join(stages)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        count = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads each tp rank holds; replicated when tp exceeds their number."""
    return max(1, num_kv_heads // tp)


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank * num_kv_heads // tp
    return range(head, head + 1)


def check_topology(topology: Topology, num_devices: int, num_heads: int, num_kv_heads: int,
                   num_layers: int) -> None:
    """Raise TopologyError naming the first rule the topology breaks."""
    tp, pp = topology.tp, topology.pp
    if tp < 1 or pp < 1:
        raise TopologyError(f"{topology}: tp and pp must be at least 1")
    if tp * pp > num_devices:
        raise TopologyError(f"{topology}: tp·pp = {tp * pp} is more than the {num_devices} devices")
    if num_heads % tp:
        raise TopologyError(f"{topology}: tp {tp} does not divide the {num_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise TopologyError(f"{topology}: tp {tp} and the {num_kv_heads} KV heads do not divide one another")
    if pp > num_layers:
        raise TopologyError(f"{topology}: pp {pp} is more than the {num_layers} layers")


def valid_topologies(num_devices: int, num_heads: int, num_kv_heads: int, num_layers: int) -> list[Topology]:
    found = []
    for tp in range(1, num_devices + 1):
        for pp in range(1, num_devices // tp + 1):
            try:
                check_topology(Topology(tp, pp), num_devices, num_heads, num_kv_heads, num_layers)
            except TopologyError:
                continue
            found.append(Topology(tp, pp))
    return found


def all_placements(topology: Topology, num_devices: int) -> list[Placement]:
    return [Placement(topology, p) for p in itertools.permutations(range(num_devices), topology.size)]


def group_member_sets(topologies: list[Topology], num_devices: int, limit: int = 32) -> list[tuple[int, ...]]:
    """Device sets that a tensor-parallel group of these topologies may span, to build before any switch needs
    them: every subset of each group size while there are at most `limit` in all (4 devices: 7), else only the
    aligned blocks (devices 0-1, 2-3, …) that default placements use; others are built when a plan picks them."""
    sizes = sorted({t.tp for t in topologies if t.tp > 1})
    every = [c for size in sizes for c in itertools.combinations(range(num_devices), size)]
    if len(every) <= limit:
        return every
    return [tuple(range(start, start + size)) for size in sizes for start in range(0, num_devices - size + 1, size)]
