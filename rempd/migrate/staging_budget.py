"""What a staged switch may take: whether the target fits beside the topology that keeps serving, and how its
transfers split into chunks, posted between two serving steps a few at a time and left in flight across the
steps that follow."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rempd.migrate.plan import SwitchPlan, WeightPiece
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.migrate.capacity import choose_pool
from rempd.topology import Placement, kv_heads_per_rank

GROWTH = 1.25  # live KV grows while staging: room for a quarter more
GIVE_BACK_MARGIN = 1.1  # more free KV blocks given back than the shortfall asks: memory is measured again after


@dataclass(frozen=True)
class StagingOptions:
    memory_limit: int | None = None  # bytes a worker may stage in; None: free device memory, or on CPU the KV budget
    chunk_bytes: int | None = None  # most bytes one worker moves between two steps; None: 256 MiB GPU, 64 KiB CPU
    # chunks posted together in one gap between two steps, as one transfer in flight: a gap's fixed costs (a
    # message per worker, the KV pack, a wait for the transfer before) then come once for all of them
    chunks_per_gap: int = 4


def size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


@dataclass(frozen=True)
class GiveBack:
    blocks: int  # free KV blocks the old pool gives back; 0: none
    why_not: str | None = None  # where the target does not fit and giving back cannot help: why


class StagingBudget:
    def __init__(self, engine, options: StagingOptions, is_cuda: bool):
        self.engine, self.is_cuda = engine, is_cuda
        self.chunk_bytes = options.chunk_bytes or ((256 << 20) if is_cuda else (64 << 10))
        self.chunks_per_gap = max(1, options.chunks_per_gap)
        self.memory_limit = options.memory_limit
        if self.memory_limit is None and not is_cuda:
            self.memory_limit = engine.config.kv_cache_memory
        self.geo = ModelGeometry(engine.model_config, engine.template.dtype)

    def stage_bytes(self, plan: SwitchPlan) -> list[int]:
        """Bytes each new worker stages: its weights, the pre-copied KV (live blocks and their growth) and one
        gap's chunks in flight."""
        cfg, expected = self.engine.model_config, self.expected_blocks()
        in_flight = self.chunk_bytes * self.chunks_per_gap
        return [self.geo.weight_bytes(shard) + expected * self.kv_block_bytes(shard) + in_flight
                for shard in (shard_of(cfg, plan.new, w) for w in plan.new.workers)]

    def expected_blocks(self) -> int:
        """Live KV blocks by the cut: the running sequences' blocks, a quarter more for growth, and one more each."""
        running = self.engine.scheduler.running
        return math.ceil(sum(len(s.block_table) for s in running) * GROWTH) + len(running)

    def unfit(self, plan: SwitchPlan, capacity: int, rooms: list[int | None]) -> str | None:
        """Why the workers cannot stage this target, or None: what each new worker stages must fit in its free
        memory (and the staging limit). capacity: the new pool's blocks; rooms: each new worker's answer to the
        staging step "room"."""
        engine = self.engine
        if self.memory_limit == 0:
            return "staging memory is off (staging_memory = 0)"
        for worker, room, need in zip(plan.new.workers, rooms, self.stage_bytes(plan)):
            free = min(x for x in (room, self.memory_limit) if x is not None)
            if need > free:
                what = "the staging limit allows" if free == self.memory_limit else "device memory has"
                return f"staging needs {size(need)} on worker {worker}; {what} {size(free)}"
        needed = engine.scheduler.blocks.blocks_for(engine.max_model_len)
        expected = self.expected_blocks()
        if self.is_cuda and capacity - expected < needed:
            return (f"with pre-copied KV held, the new pool would have {capacity - expected} blocks, "
                    f"{needed} needed for one {engine.max_model_len}-token sequence")
        return None

    def blocks_to_give_back(self, plan: SwitchPlan, rooms: list[int | None]) -> GiveBack:
        """The free blocks of the old pool whose memory would let every new worker stage: the fewest, with a
        margin, since the rooms are measured again after; none where giving back cannot make it fit, and why."""
        engine, cfg = self.engine, self.engine.model_config
        count = 0
        for worker, room, need in zip(plan.new.workers, rooms, self.stage_bytes(plan)):
            if room is None or need <= room:
                continue
            old = shard_of(cfg, plan.old, worker)
            if old is None:
                return GiveBack(0, f"worker {worker} holds no KV pool to give back")
            if self.memory_limit is not None and need > self.memory_limit:
                return GiveBack(0, "the staging limit binds, not device memory")
            count = max(count, math.ceil((need - room) * GIVE_BACK_MARGIN / self.kv_block_bytes(old)))
        blocks = engine.scheduler.blocks
        spare = blocks.num_blocks - self.expected_blocks() - blocks.blocks_for(engine.max_model_len)
        if count > spare:
            return GiveBack(0, f"giving back would take {count} free KV blocks, and {max(0, spare)} are spare beside "
                               f"the live ones, their growth and one longest sequence")
        return GiveBack(count)

    def kv_block_bytes(self, shard) -> int:
        heads = kv_heads_per_rank(self.engine.model_config.num_kv_heads, shard.tp)
        return len(shard.layers) * heads * self.geo.kv_bytes_per_block_head_layer(self.engine.config.block_size)

    def weight_chunks(self, plan: SwitchPlan) -> list[list[WeightPiece]]:
        """Peer weight pieces, split by rows so that no worker sends or receives more than a chunk at a time."""
        chunks, current, load = [], [], {}
        for piece in plan.weights:
            if piece.source != "peer":
                continue
            row = piece.nbytes // (piece.stop - piece.start)
            step = max(1, self.chunk_bytes // max(1, row))
            for a in range(piece.start, piece.stop, step):
                part = replace(piece, start=a, stop=min(piece.stop, a + step))
                part = replace(part, nbytes=(part.stop - part.start) * row)
                if current and max(load.get(part.src, 0), load.get(part.dst, 0)) + part.nbytes > self.chunk_bytes:
                    chunks.append(current)
                    current, load = [], {}
                current.append(part)
                for w in (part.src, part.dst):
                    load[w] = load.get(w, 0) + part.nbytes
        return chunks + ([current] if current else [])

    def blocks_per_chunk(self, old: Placement, new: Placement) -> int:
        """KV blocks one pre-copy chunk carries."""
        cfg = self.engine.model_config
        per_block = max(self.kv_block_bytes(s) for p in (old, new)
                        for w in p.workers if (s := shard_of(cfg, p, w)) is not None)
        return max(1, self.chunk_bytes // per_block)

    def pool_at_cut(self, kept: int, capacity: int, num_copied: int) -> tuple[int, bool]:
        """(blocks, kept) of the new pool: the old pools' memory viewed in the target's shape (`kept` blocks of it
        in every new worker) if that beats a fresh pool, which holds `capacity` blocks less, on GPU, the pre-copied
        ones still held apart; else a fresh pool's."""
        return choose_pool(self.engine, capacity - (num_copied if self.is_cuda else 0), kept)
