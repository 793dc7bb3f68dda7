"""Paged attention over the KV cache, in plain PyTorch: the CPU path and the oracle of the GPU kernels in
rempd.model.paged_attention, whose KernelMetadata has the same store/attend methods (though with the fused ops
on, the kernel path writes the cache in rempd.model.fused_ops, fused with rotary)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where a step's new tokens go in the cache and what each sequence attends to."""
    slot_mapping: torch.Tensor  # [tokens] flat slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids, padded with 0
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache for each sequence after this step
    key_mask: torch.Tensor  # [seqs, max_query, max_context] True where a query may attend a key
    query_index: torch.Tensor  # [tokens] flat index into the padded [seqs * max_query] queries

    @classmethod
    def build(cls, slot_mapping: list[int], block_tables: list[list[int]], query_lens: list[int],
              context_lens: list[int], block_size: int, device: torch.device) -> "AttentionMetadata":
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
        max_q, max_ctx = max(query_lens), max_blocks * block_size
        q_lens = torch.tensor(query_lens)
        ctx_lens = torch.tensor(context_lens)
        qi = torch.arange(max_q)
        kj = torch.arange(max_ctx)
        # query i of a sequence sits at position ctx - q_len + i and sees keys up to that position
        query_pos = (ctx_lens - q_lens)[:, None] + qi[None, :]
        mask = kj[None, None, :] <= query_pos[:, :, None]
        # padded query rows attend key 0 only so softmax stays finite; their outputs are dropped
        mask |= (qi[None, :, None] >= q_lens[:, None, None]) & (kj[None, None, :] == 0)
        index = torch.cat([torch.arange(n) + s * max_q for s, n in enumerate(query_lens)])
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            block_tables=tables.to(device),
            query_lens=query_lens,
            context_lens=context_lens,
            key_mask=mask.to(device),
            query_index=index.to(device),
        )

    def store(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(k_cache, v_cache, k, v, self.slot_mapping)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, self, scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache/v_cache: [num_blocks, block_size, kv_heads, head_dim]; k/v: [tokens, kv_heads, head_dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim] -> [tokens, heads, head_dim], reading keys through the block tables."""
    num_seqs, max_q = len(meta.query_lens), meta.key_mask.shape[1]
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    # gather each sequence's blocks: [seqs, max_blocks * block_size, kv_heads, head_dim]
    k = k_cache[meta.block_tables].flatten(1, 2)
    v = v_cache[meta.block_tables].flatten(1, 2)
    padded = q.new_zeros(num_seqs * max_q, heads, head_dim)
    padded[meta.query_index] = q
    padded = padded.view(num_seqs, max_q, heads, head_dim).transpose(1, 2)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    out = F.scaled_dot_product_attention(padded, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=meta.key_mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(num_seqs * max_q, heads, head_dim)[meta.query_index]
