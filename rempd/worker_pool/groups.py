"""Communication sub-groups of the one world group, built once per set of ranks and kept."""
from __future__ import annotations

import time

import torch.distributed as dist


class GroupCache:
    def __init__(self) -> None:
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.build_seconds = 0.0

    def get(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        """The group of these world ranks; None for a single rank, which needs no collective.

        Only the members call this (local synchronisation), so standby workers never block a switch."""
        if len(ranks) == 1:
            return None
        key = tuple(sorted(ranks))
        if key not in self.groups:
            start = time.perf_counter()
            self.groups[key] = dist.new_group(list(key), use_local_synchronization=True)
            self.build_seconds += time.perf_counter() - start
        return self.groups[key]

    def destroy(self) -> None:
        for group in self.groups.values():
            dist.destroy_process_group(group)
        self.groups.clear()
