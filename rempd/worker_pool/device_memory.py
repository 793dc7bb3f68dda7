"""How much device memory a worker has for a KV pool or a switch, under a placement it does not run yet."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from rempd.engine.kv_cache import kv_budget_bytes
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.shards import shard_of
from rempd.migrate.transform_memory import kv_bytes, transform_extra, transform_extras
from rempd.topology import Placement

RESERVE_BYTES = 1 << 30  # left free on every GPU, for the allocator's and NCCL's own needs
# a switch leaves this much more: its transfers may open NCCL channels and buffers that serving never used (the
# GPU soaks ran out of memory in 9 of 400 switches with only RESERVE_BYTES to spare)
SWITCH_SLACK_BYTES = 1 << 30
LARGE_BLOCK_MB = 512  # blocks this large are never split: KV pools are larger, most single weights smaller
# tests only: each CPU worker counts as a device with this many bytes for weights and a switch's transfers (its
# KV pool apart, sized by kv_cache_memory), so that plan's memory checks run on CPU
CPU_DEVICE_BYTES_ENV = "REMP_CPU_DEVICE_BYTES"


def cpu_device_bytes() -> int | None:
    value = os.environ.get(CPU_DEVICE_BYTES_ENV)
    return int(value) if value else None


def checks_memory(worker) -> bool:
    return worker.device.type == "cuda" or cpu_device_bytes() is not None


def spare_bytes(worker) -> int:
    """Device memory a worker can still take: free, plus the segments its allocator caches wholly unused, less the
    reserve. Free pieces of partly used segments do not count: a switch allocates pieces up to a GiB, which such
    fragments rarely hold (the GPU soak ran out with 2 GiB cached in them). A CPU worker under the test budget:
    the budget less its weights."""
    if worker.device.type != "cuda":
        return cpu_device_bytes() - worker.info()["weight_bytes"]
    free, _ = torch.cuda.mem_get_info(worker.device)
    stats = torch.cuda.memory_stats(worker.device)
    cached = (stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)
              - stats.get("inactive_split_bytes.all.current", 0))
    return free + max(0, cached) - RESERVE_BYTES


def staging_room(worker) -> int | None:
    """Bytes a staged switch may stage in on this worker: spare_bytes on a GPU. On CPU None (the driver's limit
    decides), but under the test budget that budget less the weights and the KV pool: there the pool counts, so
    that giving its free blocks back makes room on CPU as it does on a GPU."""
    if worker.device.type == "cuda":
        return max(0, spare_bytes(worker))
    if cpu_device_bytes() is None:
        return None
    held = worker.info()
    return max(0, cpu_device_bytes() - held["weight_bytes"] - held["kv_bytes"])


def configure_allocator() -> None:
    """Before a worker's first CUDA allocation: the caching allocator never splits a block of LARGE_BLOCK_MB or
    more. A freed KV pool or shard then stays one block, which the allocator gives back to the device whole when an
    allocation does not fit. Split, it held the pieces a 70B staged switch carved from it (the smaller pool, the
    new rows); the stop-the-world switch after found 30 GiB free in that segment, scattered, and no room for its
    28 GiB pool (4x H100, session 9: three switches out of memory, each recovered by restarting the workers). An
    operator's own PYTORCH_CUDA_ALLOC_CONF is kept."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", f"max_split_size_mb:{LARGE_BLOCK_MB}")


def alloc_retries(worker) -> int:
    """How often the allocator has flushed its cache to retry an allocation (0 off CUDA)."""
    if worker.device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(worker.device).get("num_alloc_retries", 0)


def outside_allocator_bytes(worker) -> int:
    """Device memory this process holds outside PyTorch's allocator (CUDA context, NCCL buffers); 0 off CUDA."""
    if worker.device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(worker.device)
    return total - free - torch.cuda.memory_reserved(worker.device)


def switch_slack(worker) -> int:
    return SWITCH_SLACK_BYTES if worker.device.type == "cuda" else 0


def kv_capacity(worker, placement: Placement, block_size: int, plan: SwitchPlan | None = None) -> int | None:
    """KV blocks this worker could hold under `placement`, counting what a switch would free. For the switch of
    `plan`, the live KV it packs and receives is still held when the new pool is allocated."""
    shard = shard_of(worker.setup.model, placement, worker.setup.index)
    if shard is None:
        return None
    shape = worker.kv_shape_for(shard, block_size)
    budget = kv_budget_bytes(worker.device, worker.setup.kv_cache_memory, worker.setup.gpu_memory_utilization,
                             reserve_bytes=RESERVE_BYTES)
    if worker.device.type == "cuda":
        held = worker.info()
        budget += held["kv_bytes"] + held["weight_bytes"] - worker.geometry.weight_bytes(shard)
        if plan is not None:
            budget -= sum(kv_bytes(plan, worker.setup.index)) + switch_slack(worker)
    return budget // shape.bytes_per_block


def pool_blocks(worker, plan: SwitchPlan, block_size: int) -> int:
    """Blocks of the target's shape that this worker's pool memory holds as it is (0: no pool or no new shard)."""
    shard = shard_of(worker.setup.model, plan.new, worker.setup.index)
    if shard is None or worker.kv_buffer is None:
        return 0
    return worker.kv_shape_for(shard, block_size).blocks_in(worker.kv_buffer)


def reusable_blocks(worker, plan: SwitchPlan, block_size: int, round_bytes: int) -> int:
    """Blocks of the target's shape that this worker's pool memory holds, if the switch can keep that memory
    (the transform, in the plan's order, fits beside it): no free, allocation or zeroing of the pool. 0 if not."""
    blocks = pool_blocks(worker, plan, block_size)
    if blocks and checks_memory(worker):
        extra = transform_extra(plan, worker.geometry, worker.setup.index, round_bytes)
        if spare_bytes(worker) < extra + switch_slack(worker):
            return 0
    return blocks


@dataclass
class SwitchBudget:
    """One worker's memory for a planned switch, asked once per plan: the pool it could size, and the room its
    transform leaves, in plain order and in the plan's layer order."""
    capacity: int | None  # KV blocks of a fresh pool under the target; None: no shard there
    # bytes left at the transform's peak with the pool freed (negative: short); None on CPU, where workers share
    # the host's memory
    headroom: tuple[int, int] | None
    kept_blocks: tuple[int, int]  # blocks the pool's memory holds in the target's shape if it is kept; 0: no room


def switch_budget(worker, plan: SwitchPlan, block_size: int, round_bytes: int, growth_blocks: int) -> SwitchBudget:
    """growth_blocks: live KV blocks the steps still in flight may add before the switch (held beside the pool)."""
    held = replace(plan, num_live_blocks=plan.num_live_blocks + growth_blocks)
    capacity = kv_capacity(worker, plan.new, block_size, held)
    blocks = pool_blocks(worker, plan, block_size)
    if not checks_memory(worker):
        return SwitchBudget(capacity, None, (blocks, blocks))
    extras = transform_extras(plan, worker.geometry, worker.setup.index, round_bytes)
    room = spare_bytes(worker) - switch_slack(worker)
    kept = tuple(blocks if room >= extra else 0 for extra in extras)
    if worker.device.type == "cuda" and worker.kv is not None:
        room += worker.kv.numel() * worker.kv.element_size()
    return SwitchBudget(capacity, tuple(room - extra for extra in extras), kept)
