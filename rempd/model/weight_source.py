"""Where a stage's weights come from: the host store when a shard loads, or a switch's mix of stay, peer and host."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

FillRows = Callable[[str, tuple[int, int], torch.Tensor], None]  # copy rows [a, b) of a stored tensor into out


@dataclass
class WeightSource:
    fill: FillRows
    row_shape: Callable[[str], tuple[int, ...]]  # a stored tensor's shape without its first axis
    dtype: torch.dtype
    device: torch.device
    # called with the first name and the bytes before each allocation: a layer-ordered switch runs its steps there
    before: Callable[[str, int], None] | None = None

    def take(self, *spans: tuple[str, tuple[int, int]]) -> torch.Tensor:
        """The rows of these tensors stacked in one allocation: fused weights are written in place, never
        concatenated, so building a stage copies each byte once."""
        total = sum(b - a for _, (a, b) in spans)
        shape = (total, *self.row_shape(spans[0][0]))
        if self.before is not None:
            self.before(spans[0][0], math.prod(shape) * self.dtype.itemsize)
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        offset = 0
        for name, (a, b) in spans:
            self.fill(name, (a, b), out[offset:offset + b - a])
            offset += b - a
        return out
