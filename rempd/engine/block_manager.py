"""Logical KV block ids, shared by every worker: the daemon decides, the workers only index."""
from __future__ import annotations

from collections import deque

from rempd.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @classmethod
    def holding(cls, num_blocks: int, block_size: int, num_used: int) -> "BlockManager":
        """A pool whose ids 0..num_used-1 hold live blocks, moved there by a switch or a resize."""
        blocks = cls(num_blocks, block_size)
        blocks.free_blocks = deque(range(num_used, num_blocks))
        return blocks

    @classmethod
    def renumbered(cls, seqs: list[Sequence], num_blocks: int, block_size: int) -> "BlockManager":
        """A pool whose ids 0..n-1 hold the blocks of `seqs`, in their order (where a switch or a resize moved
        them): each sequence takes its new ids."""
        next_id = 0
        for seq in seqs:
            count = len(seq.block_table)
            seq.block_table = list(range(next_id, next_id + count))
            next_id += count
        return cls.holding(num_blocks, block_size, next_id)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_hold(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing_blocks(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for its first `num_tokens` tokens."""
        missing = self.missing_blocks(seq, num_tokens)
        if missing > self.num_free:
            raise RuntimeError(f"{seq.request_id}: needs {missing} blocks, {self.num_free} free")
        if missing:
            seq.block_table.extend(self.free_blocks.popleft() for _ in range(missing))

    def release(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
