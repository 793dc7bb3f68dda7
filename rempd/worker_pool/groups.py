"""Communication sub-groups of the one world group, built once per set of ranks and kept.

Every worker, standby ones included, builds every group in the same order: creating a gloo group with
only its members taking part hangs once groups overlap, and a collective creation keeps names in step."""
from __future__ import annotations

import time

import torch.distributed as dist

from rempd.topology import Placement


class GroupCache:
    def __init__(self) -> None:
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.build_seconds = 0.0

    def build(self, placement: Placement) -> int:
        """Create the tensor-parallel groups of `placement` that are not cached yet; all workers call this.
        Returns how many were built."""
        return self.build_sets([placement.tp_group(p) for p in range(placement.topology.pp)])

    def build_sets(self, member_sets: list[tuple[int, ...]]) -> int:
        keys = sorted({tuple(sorted(members)) for members in member_sets})
        built = 0
        for key in keys:
            if len(key) > 1 and key not in self.groups:
                start = time.perf_counter()
                self.groups[key] = dist.new_group(list(key))
                self.build_seconds += time.perf_counter() - start
                built += 1
        return built

    def get(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        """The group of these world ranks; None for a single rank, which needs no collective."""
        if len(ranks) == 1:
            return None
        return self.groups[tuple(sorted(ranks))]

    def destroy(self) -> None:
        for group in self.groups.values():
            if group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        self.groups.clear()
