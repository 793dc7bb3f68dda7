"""Installing a placement on the workers: every active worker loads its shard from the weight store, then one KV
pool size that all of them can hold is allocated everywhere."""
from __future__ import annotations

from rempd.engine.block_manager import BlockManager
from rempd.engine.graph_warmup import capture_graphs, stage_max_len
from rempd.engine.scheduler import Scheduler
from rempd.topology import Placement


def install_placement(engine, placement: Placement) -> None:
    """Build `placement` on `engine` (an LLMEngine) and give its scheduler a fresh block table of the new pool.

    Any sequence still holding blocks must have been preempted first: the old pool's contents are gone."""
    cfg, config = engine.model_config, engine.config
    max_len = stage_max_len(engine)
    engine.pool.call("prepare_groups", placement)
    infos = engine.pool.call("load_shard", placement, config.block_size, max_len)
    num_blocks = min(info.kv_capacity_blocks for info in infos if info is not None)
    if num_blocks < 1:
        raise RuntimeError(f"{placement.topology}: no memory left for even one KV block")
    engine.pool.call("allocate_kv", num_blocks)
    engine.placement = placement
    capture_graphs(engine)
    blocks = BlockManager(num_blocks, config.block_size)
    if not hasattr(engine, "scheduler"):
        # the context length is fixed for the daemon's life; a switch must give every topology room for it
        engine.max_model_len = min(max_len, num_blocks * config.block_size)
        engine.scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                     engine.max_model_len, cfg.eos_token_ids)
    else:
        engine.scheduler.blocks = blocks
