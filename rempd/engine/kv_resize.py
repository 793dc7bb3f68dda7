"""Resizing the KV pool under live requests, with no step in flight: a staged switch gives the old pool's free
blocks back when the target's shards do not fit beside it (issue #7: never the live requests' blocks), and takes
them again if it is given up. The live blocks move to ids 0..n-1 of the new pool, in the order of the running
sequences, and the live batch's decode graphs are captured again over it."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.engine.block_manager import BlockManager
from rempd.engine.graph_warmup import capture_live_graphs


def resize_pool(engine, num_blocks: int) -> float:
    """Every active worker's pool now holds `num_blocks`, or as many as the fullest device fits. Seconds the live
    batch's graph capture took."""
    holders = [seq for seq in engine.scheduler.running if seq.block_table]
    old_ids = [block for seq in holders for block in seq.block_table]
    if len(old_ids) > num_blocks:
        raise ValueError(f"a pool of {num_blocks} KV blocks cannot hold the {len(old_ids)} live ones")
    held = engine.pool.call("resize_pool", num_blocks, old_ids, workers=engine.active)
    # renumbered once every worker moved the blocks (a failed call leaves the old ids to the recovery); ids are
    # shared by every worker, so a pool that got more than the smallest leaves its tail unused
    engine.scheduler.blocks = BlockManager.renumbered(holders, min(held), engine.config.block_size)
    return capture_live_graphs(engine)


@dataclass
class GivenBack:
    """Free blocks a staged switch gave back; taken again if it does not commit."""
    pool_before: int = 0
    count: int = 0

    def give(self, engine, count: int) -> float:
        self.pool_before, self.count = engine.scheduler.blocks.num_blocks, count
        return resize_pool(engine, self.pool_before - count)

    def take_back(self, engine) -> None:
        """With no step in flight: the pool the old topology had, unless a rollback installed one already."""
        if self.count and engine.scheduler.blocks.num_blocks < self.pool_before:
            resize_pool(engine, self.pool_before)
