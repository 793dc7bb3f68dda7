"""One KV allocation per worker, shaped [local_layers, 2, num_blocks, block_size, local_kv_heads, head_dim]."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    local_layers: int
    block_size: int
    local_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.local_layers * 2 * self.block_size * self.local_kv_heads * self.head_dim * elem

    def allocate(self, num_blocks: int, device: torch.device) -> torch.Tensor:
        """Raw bytes for a pool of `num_blocks`; `view` gives them this shape (and a later one, another)."""
        return torch.zeros(num_blocks * self.bytes_per_block, dtype=torch.uint8, device=device)

    def view(self, buffer: torch.Tensor, num_blocks: int) -> torch.Tensor:
        pool = buffer[:num_blocks * self.bytes_per_block].view(self.dtype)
        return pool.view(self.local_layers, 2, num_blocks, self.block_size, self.local_kv_heads, self.head_dim)

    def blocks_in(self, buffer: torch.Tensor) -> int:
        return buffer.numel() // self.bytes_per_block

    def allocate_holding(self, num_blocks: int, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw bytes, view) of a pool of up to `num_blocks` whose first blocks are `live` ([layers, 2, n, ...]).
        Fewer where the device lacks the room: a pool growing back may find less than it left, since groups built
        meanwhile hold NCCL buffers."""
        if live.device.type == "cuda":
            torch.cuda.empty_cache()  # else a pool freed just before stays cached, in pieces others may not reuse
        while True:
            try:
                buffer = self.allocate(num_blocks, live.device)
                break
            except torch.OutOfMemoryError:
                if num_blocks <= live.shape[2]:
                    raise
                num_blocks = max(live.shape[2], num_blocks * 9 // 10)
        pool = self.view(buffer, num_blocks)
        pool[:, :, :live.shape[2]] = live
        return buffer, pool


def kv_budget_bytes(device: torch.device, cpu_bytes: int, gpu_memory_utilization: float,
                    reserve_bytes: int) -> int:
    """Bytes this worker may give its KV pool, after weights are loaded."""
    if device.type != "cuda":
        return cpu_bytes
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - total * (1 - gpu_memory_utilization)) - reserve_bytes)
