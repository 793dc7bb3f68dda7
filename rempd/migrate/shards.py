"""What each worker holds under a placement: layers, weight rows, KV heads. Pure; no torch."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from rempd.model.config import ModelConfig
from rempd.model.sharding import shard_rows, stage_tensor_names
from rempd.topology import Placement, kv_head_range, stage_layers

ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Shard:
    worker: int
    pp_rank: int
    tp_rank: int
    tp: int
    pp: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1


def shard_of(cfg: ModelConfig, placement: Placement, worker: int) -> Shard | None:
    coords = placement.coords(worker)
    if coords is None:
        return None
    topo = placement.topology
    return Shard(worker, coords[0], coords[1], topo.tp, topo.pp, stage_layers(cfg.num_layers, topo.pp)[coords[0]])


@dataclass(frozen=True)
class ModelGeometry:
    """Stored row counts and row sizes of every tensor, and KV sizes, for one model and dtype."""
    cfg: ModelConfig
    dtype: str

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @cached_property
    def row_bytes(self) -> dict[str, int]:
        """Bytes of one stored row: every matrix is stored with hidden_size columns (row-parallel ones
        transposed), vectors have one element per row."""
        cfg, e = self.cfg, self.element_bytes
        names = stage_tensor_names(cfg, range(cfg.num_layers), True, True)
        return {n: e if n.endswith(("norm.weight", ".bias")) else cfg.hidden_size * e for n in names}

    def tensor_names(self, shard: Shard) -> list[str]:
        return stage_tensor_names(self.cfg, shard.layers, shard.is_first, shard.is_last)

    def rows(self, shard: Shard, name: str) -> tuple[int, int]:
        return shard_rows(name, self.cfg, shard.tp, shard.tp_rank)

    def kv_heads(self, shard: Shard) -> range:
        return kv_head_range(self.cfg.num_kv_heads, shard.tp, shard.tp_rank)

    def kv_bytes_per_block_head_layer(self, block_size: int) -> int:
        """K and V of one head of one layer for one block."""
        return 2 * block_size * self.cfg.head_dim * self.element_bytes

    def weight_bytes(self, shard: Shard) -> int:
        total = 0
        for name in self.tensor_names(shard):
            start, stop = self.rows(shard, name)
            total += (stop - start) * self.row_bytes[name]
        return total

    def holdings(self, shard: Shard) -> dict[str, tuple[int, int]]:
        return {name: self.rows(shard, name) for name in self.tensor_names(shard)}
