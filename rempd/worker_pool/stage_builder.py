"""A worker's LlamaStage for one shard: how install, a switch transform and a staged switch all build one."""
from __future__ import annotations

from typing import Callable

from rempd.migrate.shards import Shard
from rempd.model.layers import TensorParallel
from rempd.model.llama import LlamaStage
from rempd.model.weight_source import FillRows, WeightSource
from rempd.topology import Placement


def build_stage(worker, placement: Placement, shard: Shard, fill: FillRows, max_len: int,
                before: Callable[[str, int], None] | None = None, order: list[int] | None = None) -> LlamaStage:
    """The stage of `shard` under `placement` on `worker` (a rempd.worker_pool.worker.Worker), its rows written by
    `fill`. The tensor-parallel group comes from the worker's cache: every worker built it together beforehand, since
    a member-only creation hangs on gloo. `before` and `order` are a layer-ordered switch's (see WeightSource and
    LlamaStage)."""
    members = placement.tp_group(shard.pp_rank)
    tp = TensorParallel(shard.tp, shard.tp_rank, worker.groups.get(members), members)
    source = WeightSource(fill, worker.row_shape, worker.dtype, worker.device, before)
    return LlamaStage(worker.setup.model, shard.layers, shard.is_first, shard.is_last, tp, source, max_len,
                      worker.device, order)
