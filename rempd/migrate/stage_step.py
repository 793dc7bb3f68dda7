"""The worker's entry point for every step of a staged switch (Worker.staged).

The steps the driver posts between serving steps (groups, chunk, poll, build, graphs) answer with a
StagedReply: the seconds this worker's host spent in the step, which is what the serving steps behind it waited,
and whether the host-store loads are in, so that the driver sends the build only once it would not wait."""
from __future__ import annotations

import time
from dataclasses import dataclass

from rempd.migrate.stage_shard import ShardStaging
from rempd.worker_pool.device_memory import staging_room


@dataclass(frozen=True)
class StagedReply:
    seconds: float
    loaded: bool = True
    pool_blocks: int = 0  # to "begin": blocks of the target's shape this worker's pool memory holds
    loads: dict | None = None  # to "build": the background loads' times and bytes (ShardStaging.loads)


def stage_step(worker, op: str, *args) -> object:
    # bytes of device memory free for staging, counting the allocator's unused cache: the headroom
    # gpu_memory_utilization leaves, and what free KV blocks given back made (StagedSwitch._give_back)
    if op == "room":
        return staging_room(worker)
    start = time.perf_counter()
    if op == "groups":  # every worker, staging or not, builds the groups together
        worker.prepare_groups(*args)
        return StagedReply(time.perf_counter() - start)
    if op == "begin":
        worker.staging = ShardStaging(worker, *args)
        return StagedReply(time.perf_counter() - start, pool_blocks=worker.staging.pool_blocks())
    staging: ShardStaging | None = worker.staging
    if staging is None:
        if op == "abort":
            return None
        raise RuntimeError(f"no staged switch to {op}")
    if op in ("chunk", "poll", "build", "graphs"):
        if op == "chunk":
            staging.chunk(*args)
        elif op == "build":
            staging.build()
        elif op == "graphs":
            staging.graphs(*args)
        return StagedReply(time.perf_counter() - start, staging.loaded(),
                           loads=staging.loads if op == "build" else None)
    if op in ("cut", "abort"):
        worker.staging = None
        return staging.cut(*args) if op == "cut" else staging.abort()
    raise ValueError(f"unknown staging step {op!r}")
