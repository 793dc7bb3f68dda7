"""Tensor-parallel building blocks. Every collective takes its group from the TensorParallel it is given."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class TensorParallel:
    size: int
    rank: int
    group: dist.ProcessGroup | None  # None when size is 1
    # world rank of each tp rank; torch orders a group's members by world rank, a placement may not
    members: tuple[int, ...] = ()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate every rank's column block; blocks are padded to equal width for the collective."""
        if self.group is None:
            return x
        per = -(-total // self.size)
        if x.shape[-1] < per:
            x = F.pad(x, (0, per - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        by_world_rank = sorted(self.members)
        ordered = [parts[by_world_rank.index(world_rank)] for world_rank in self.members]
        return torch.cat(ordered, dim=-1)[..., :total]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int,
                             tp: TensorParallel) -> torch.Tensor:
    """weight holds vocab rows [start, start + len); other ranks fill in the rest through the all-reduce."""
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    out = F.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    if tp.group is not None:
        out = out * inside.unsqueeze(-1).to(out.dtype)
    return tp.all_reduce(out)


def row_parallel(x: torch.Tensor, weight_t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """weight_t is this rank's [in_local, out] block of the transposed weight: a contiguous slice."""
    return tp.all_reduce(x @ weight_t)
