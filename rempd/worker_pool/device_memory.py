"""How much device memory a worker has for a KV pool or a switch, under a placement it does not run yet."""
from __future__ import annotations

import torch

from rempd.engine.kv_cache import kv_budget_bytes
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.reshard import transform_bytes
from rempd.migrate.shards import shard_of
from rempd.topology import Placement

RESERVE_BYTES = 1 << 30  # left free on every GPU, for the allocator's and NCCL's own needs


def spare_bytes(worker) -> int:
    """Device memory a worker can still take: free, plus what its allocator caches unused, less the reserve."""
    free, _ = torch.cuda.mem_get_info(worker.device)
    cached = torch.cuda.memory_reserved(worker.device) - torch.cuda.memory_allocated(worker.device)
    return free + cached - RESERVE_BYTES


def kv_capacity(worker, placement: Placement, block_size: int) -> int | None:
    """KV blocks this worker could hold under `placement`, counting what a switch would free."""
    shard = shard_of(worker.setup.model, placement, worker.setup.index)
    if shard is None:
        return None
    shape = worker.kv_shape_for(shard, block_size)
    budget = kv_budget_bytes(worker.device, worker.setup.kv_cache_memory, worker.setup.gpu_memory_utilization,
                             reserve_bytes=RESERVE_BYTES)
    if worker.device.type == "cuda":
        held = worker.info()
        budget += held["kv_bytes"] + held["weight_bytes"] - worker.geometry.weight_bytes(shard)
    return budget // shape.bytes_per_block


def reusable_blocks(worker, plan: SwitchPlan, block_size: int, round_bytes: int) -> int:
    """Blocks of the target's shape that this worker's pool memory holds, if the switch can keep that memory
    (the new shard and the transfers fit beside it): no free, allocation or zeroing of the pool. 0 if not."""
    shard = shard_of(worker.setup.model, plan.new, worker.setup.index)
    if shard is None or worker.kv_buffer is None:
        return 0
    if worker.device.type == "cuda":
        needed = transform_bytes(plan, worker.setup.index, worker.geometry.weight_bytes(shard), round_bytes)
        if spare_bytes(worker) < needed:
            return 0
    return worker.kv_shape_for(shard, block_size).blocks_in(worker.kv_buffer)


def transform_headroom(worker, plan: SwitchPlan, round_bytes: int) -> int | None:
    """Bytes this device has left at the transform's peak, when old and new shards coexist (negative: it
    would run out); None on CPU, whose workers share the host's memory."""
    if worker.device.type != "cuda":
        return None
    shard = shard_of(worker.setup.model, plan.new, worker.setup.index)
    new_bytes = worker.geometry.weight_bytes(shard) if shard else 0
    held_kv = 0 if worker.kv is None else worker.kv.numel() * worker.kv.element_size()
    return spare_bytes(worker) + held_kv - transform_bytes(plan, worker.setup.index, new_bytes, round_bytes)
