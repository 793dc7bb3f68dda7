"""Paged attention on the GPU: Triton kernels that read K/V through the block tables in place, for decode and
chunked prefill alike (a chunk of queries attends to its cached context and, causally, to itself).

The reference path in rempd.model.attention stays the CPU path and the oracle. Triton is imported lazily, so
CPU machines without it never touch this module's kernels; under TRITON_INTERPRET=1 they run on CPU tensors."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


# split-KV decode when a step has at most this many (sequence, KV head) pairs: with under two programs per SM of
# an H100, most SMs would idle while each program walks a whole context. REMPD_SPLIT_KV=0 turns it off.
SPLIT_KV_BELOW = 256
SPLIT_MIN_KEYS = 128  # keys per split at least
SPLIT_MAX_PARTS = 64  # splits at most: longer contexts get longer splits
SPLIT_BLOCK_N = 64


def split_kv_below() -> int:
    return SPLIT_KV_BELOW if os.environ.get("REMPD_SPLIT_KV", "1") != "0" else 0


def kernels_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels():
    from rempd.model import triton_kernels  # compiles nothing until first launch

    return triton_kernels


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class KernelMetadata:
    """Step metadata as the kernels read it. Every tensor is int64 on the step's device; rows of a padded
    (CUDA-graph) batch have slot -1 (nothing written) and context length 0 (nothing read, output 0)."""
    slot_mapping: torch.Tensor  # [tokens]
    block_tables: torch.Tensor  # [seqs, max_blocks]
    query_start: torch.Tensor  # [seqs + 1] offsets of each sequence's queries in the step's tokens
    context_lens: torch.Tensor  # [seqs] tokens in the cache after this step, the new ones included
    max_query_len: int

    def store(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Only with the fused ops off (REMPD_FUSED_OPS=0): they write the cache fused with rotary.
        k_cache/v_cache: [num_blocks, block_size, kv_heads, head_dim]; k/v: [tokens, kv_heads, head_dim]
        whose rows may be strided (views into the fused qkv projection) but whose heads are packed."""
        tokens, kv_heads, head_dim = k.shape
        width = kv_heads * head_dim
        for t in (k, v):
            assert t.stride(2) == 1 and t.stride(1) == head_dim, "heads of a token must be packed"
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        if tokens:
            _kernels().store_kv[(tokens,)](k, v, k_cache, v_cache, self.slot_mapping, k.stride(0), v.stride(0),
                                           width, BLOCK=_pow2(width, 16))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [tokens, heads, head_dim] -> [tokens, heads, head_dim]. Query head h reads KV head h // group,
        which covers GQA and KV heads replicated across TP ranks alike."""
        tokens, heads, head_dim = q.shape
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        group = heads // kv_heads
        out = torch.empty_like(q)
        if tokens == 0:
            return out
        if self.max_query_len == 1 and self.context_lens.shape[0] * kv_heads <= split_kv_below():
            return self._attend_split(q, k_cache, v_cache, scale, out)
        # a tile's rows are (query token, head of the group) pairs: decode packs a GQA group into one tile
        block_m = _pow2(group, 16 if self.max_query_len == 1 else 64)
        per_tile = block_m // group
        grid = (self.context_lens.shape[0], kv_heads, -(-self.max_query_len // per_tile))
        kernels = _kernels()
        kernels.paged_attention[grid](
            q, k_cache, v_cache, out, self.block_tables, self.query_start, self.context_lens, scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), self.block_tables.stride(0),
            BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim, 16),
            BLOCK_M=block_m, BLOCK_N=64, IEEE=q.dtype == torch.float32, INTERPRET=kernels.INTERPRETED)
        return out

    def _attend_split(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                      out: torch.Tensor) -> torch.Tensor:
        """Decode with few (sequence, KV head) pairs: each sequence's keys are split into partitions that run
        in parallel (flash-decoding), then combined. The split count follows from the block table's width, known
        on the host, so a CUDA graph's launch grid stays fixed; splits past a sequence's context return at once."""
        _, heads, head_dim = q.shape
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        seqs, max_context = self.block_tables.shape[0], self.block_tables.shape[1] * block_size
        part = max(SPLIT_MIN_KEYS, _pow2(-(-max_context // SPLIT_MAX_PARTS), 1))
        splits = -(-max_context // part)
        part_acc = torch.empty(seqs, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(seqs, heads, splits, 2, dtype=torch.float32, device=q.device)
        kernels, block_d = _kernels(), _pow2(head_dim, 16)
        kernels.paged_decode_split[(seqs, kv_heads, splits)](
            q, k_cache, v_cache, part_acc, part_ml, self.block_tables, self.query_start, self.context_lens, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            self.block_tables.stride(0), BLOCK_SIZE=block_size, GROUP=heads // kv_heads, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_M=_pow2(heads // kv_heads, 16), BLOCK_N=SPLIT_BLOCK_N, PART=part,
            IEEE=q.dtype == torch.float32)
        # `splits` varies between eager steps: a runtime argument, so that no step compiles a new kernel
        kernels.paged_decode_combine[(seqs, heads)](
            part_acc, part_ml, out, self.query_start, self.context_lens, splits, out.stride(0), out.stride(1),
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_pow2(splits, 2), PART=part)
        return out
