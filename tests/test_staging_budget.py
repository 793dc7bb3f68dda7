"""How many free KV blocks a staged switch gives back, on the geometry of llama2-70b on 4 GPUs (pure logic): the
fewest whose memory covers the worst new worker's shortfall, with a margin; none where that cannot help. And the
pool a give-back leaves, or a take-back restores, holds the live blocks even where the device has less room."""
import math
from types import SimpleNamespace

from rempd.engine.block_manager import BlockManager
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.shards import shard_of
from rempd.migrate.staging_budget import GIVE_BACK_MARGIN, GiveBack, StagingBudget, StagingOptions
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Placement, Topology

GIB = 1 << 30
POOL_BLOCKS = 26_000  # what a TP1PP4 worker's pool holds on an 80 GB H100 beside 34 GB of weights


def budget(live_blocks: int = 200, memory_limit: int | None = None) -> StagingBudget:
    running = [SimpleNamespace(block_table=list(range(i, live_blocks, 8))) for i in range(8)]
    engine = SimpleNamespace(model_config=ModelConfig.from_dict(shape_config("llama2-70b")),
                             template=SimpleNamespace(dtype="bfloat16"), max_model_len=4096,
                             config=SimpleNamespace(block_size=16, kv_cache_memory=0),
                             scheduler=SimpleNamespace(running=running, blocks=BlockManager(POOL_BLOCKS, 16)))
    return StagingBudget(engine, StagingOptions(memory_limit=memory_limit), is_cuda=True)


def plan(old: Placement, new: Placement) -> SwitchPlan:
    return SwitchPlan(old=old, new=new, weights=[], kv=[], num_live_blocks=0, kv_bytes_per_piece_unit=0)


TP1PP4, TP2PP2 = Placement.default(Topology(1, 4)), Placement.default(Topology(2, 2))


def test_gives_back_the_fewest_blocks_that_cover_the_worst_shortfall():
    b, p = budget(), plan(TP1PP4, TP2PP2)
    rooms = [10 * GIB, 9 * GIB, 11 * GIB, 10 * GIB]  # session 8: 9.3-11.3 GiB free beside the pool
    assert b.unfit(p, capacity=30_000, rooms=rooms).startswith("staging needs")
    count = b.blocks_to_give_back(p, rooms).blocks
    per_block = b.kv_block_bytes(shard_of(b.engine.model_config, TP1PP4, 1))
    need = b.stage_bytes(p)[1]  # worker 1 has the least room
    assert count == math.ceil((need - 9 * GIB) * GIVE_BACK_MARGIN / per_block)
    assert 0 < count < POOL_BLOCKS
    # what the old pool gives back then leaves every new worker the room it needs
    assert b.unfit(p, 30_000, [r + count * per_block for r in rooms]) is None


def test_gives_back_nothing_where_it_cannot_help():
    rooms = [9 * GIB] * 4
    # enough room already
    assert budget().blocks_to_give_back(plan(TP1PP4, TP2PP2), [80 * GIB] * 4) == GiveBack(0)
    # a new worker that stood by holds no pool to give back
    two = Placement.default(Topology(1, 2))
    standby = budget().blocks_to_give_back(plan(two, TP2PP2), rooms)
    assert standby == GiveBack(0, "worker 2 holds no KV pool to give back")
    # the operator's staging limit binds, not device memory
    limited = budget(memory_limit=8 * GIB).blocks_to_give_back(plan(TP1PP4, TP2PP2), rooms)
    assert limited.blocks == 0 and "staging limit" in limited.why_not
    # the live blocks and their growth, with one longest sequence, would not fit in what is left: the fallback's
    # reason says so (70B TP1PP4 -> TP4PP1 on 4x H100 fell back saying only what staging needed)
    crowded = budget(live_blocks=POOL_BLOCKS - 300)
    give = crowded.blocks_to_give_back(plan(TP1PP4, TP2PP2), rooms)
    spare = POOL_BLOCKS - crowded.expected_blocks() - crowded.engine.scheduler.blocks.blocks_for(
        crowded.engine.max_model_len)
    assert give.blocks == 0 and give.why_not.startswith("giving back would take ")
    assert f"and {max(0, spare)} are spare" in give.why_not, give


def test_a_pool_growing_back_holds_what_fits_and_keeps_its_live_blocks(monkeypatch):
    import pytest
    import torch

    from rempd.engine.kv_cache import KVShape

    shape = KVShape(local_layers=2, block_size=4, local_kv_heads=2, head_dim=8, dtype=torch.float32)
    live = torch.randn(2, 2, 3, 4, 2, 8)
    allocate = KVShape.allocate

    def short_of_room(self, num_blocks, device):  # a device with room for 50 blocks
        if num_blocks > 50:
            raise torch.OutOfMemoryError("no room")
        return allocate(self, num_blocks, device)

    monkeypatch.setattr(KVShape, "allocate", short_of_room)
    buffer, pool = shape.allocate_holding(100, live)
    assert pool.shape[2] == 45  # 100, 90, 81, 72, 64, 57, 51 were refused: a tenth less each time
    assert torch.equal(pool[:, :, :3], live) and not pool[:, :, 3:].any()
    with pytest.raises(torch.OutOfMemoryError):  # not even the live blocks fit: nothing to hold them in
        KVShape(2, 4, 2, 8, torch.float32).allocate_holding(100, torch.randn(2, 2, 60, 4, 2, 8))
