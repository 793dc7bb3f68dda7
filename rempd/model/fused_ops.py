"""The small per-layer ops of a decoder layer, two ways: ReferenceOps in plain PyTorch (the CPU path and the
oracle) and FusedOps, one Triton kernel each (the GPU kernel path). A step uses FusedOps exactly when it runs the
paged-attention kernels (KernelMetadata), so CPU machines without Triton never reach a Triton kernel;
REMPD_FUSED_OPS=0 keeps the kernel path on ReferenceOps (to compare, or to rule the fused kernels out).

Both carry the residual stream apart from the layer outputs, so that each residual add is fused into the RMSNorm
that follows it: add_rms_norm(x, residual) returns (norm(x + residual), x + residual)."""
from __future__ import annotations

import os

import torch

from rempd.model.attention import AttentionMetadata
from rempd.model.layers import rms_norm
from rempd.model.paged_attention import KernelMetadata
from rempd.model.rotary import Rotary


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


class ReferenceOps:
    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: normalise only these rows (the returned residual then holds only them too)."""
        if residual is not None:
            x = x + residual
        if rows is not None:
            x = x[rows]
        return rms_norm(x, weight, eps), x

    @staticmethod
    def add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return x if residual is None else x + residual

    @staticmethod
    def rotate_and_store(qkv: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                         meta: AttentionMetadata | KernelMetadata, kv: torch.Tensor, q_width: int, kv_width: int,
                         head_dim: int) -> torch.Tensor:
        """qkv: [tokens, q_width + 2 kv_width]. Rotates q and k, writes k and v to the cache kv ([2, blocks,
        block_size, kv_heads, head_dim]) at the step's slots; returns q as [tokens, heads, head_dim]."""
        q, k, v = qkv.split([q_width, kv_width, kv_width], -1)
        q = rotary.apply(q.view(-1, q_width // head_dim, head_dim), positions)
        k = rotary.apply(k.view(-1, kv_width // head_dim, head_dim), positions)
        meta.store(kv[0], kv[1], k, v.view(-1, kv_width // head_dim, head_dim))
        return q

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


class FusedOps(ReferenceOps):
    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from rempd.model import fused_kernels

        count, width = (x.shape[0] if rows is None else rows.shape[0]), x.shape[-1]
        assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
        out = torch.empty(count, width, dtype=x.dtype, device=x.device)
        # without a residual the sum is x itself, or its chosen rows
        new_residual = torch.empty_like(out) if residual is not None else x if rows is None else x[rows]
        if count:
            fused_kernels.rms_norm[(count,)](
                x, x if residual is None else residual, weight, out, new_residual, x if rows is None else rows,
                eps, x.stride(0), x.stride(0) if residual is None else residual.stride(0), out.stride(0),
                new_residual.stride(0), WIDTH=width, BLOCK=_pow2(width), HAS_RESIDUAL=residual is not None,
                HAS_ROWS=rows is not None, num_warps=min(max(_pow2(width) // 512, 4), 16))
        return out, new_residual

    @staticmethod
    def rotate_and_store(qkv: torch.Tensor, positions: torch.Tensor, rotary: Rotary, meta: KernelMetadata,
                         kv: torch.Tensor, q_width: int, kv_width: int, head_dim: int) -> torch.Tensor:
        """One kernel: q rotated in place in qkv (a fresh projection output, returned as a view of it), k rotated
        and v copied straight into the cache."""
        from rempd.model import fused_kernels

        assert qkv.is_contiguous() and kv[0].is_contiguous() and kv[1].is_contiguous()
        assert rotary.cos.is_contiguous() and rotary.sin.is_contiguous()
        tokens, q_heads, kv_heads = qkv.shape[0], q_width // head_dim, kv_width // head_dim
        block_h = min(_pow2(q_heads + kv_heads), 16)
        if tokens:
            fused_kernels.rotary_store[(tokens, -(-(q_heads + kv_heads) // block_h))](
                qkv, positions, rotary.cos, rotary.sin, meta.slot_mapping, kv[0], kv[1], qkv.stride(0),
                rotary.cos.stride(0), Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK_H=block_h,
                BLOCK_D=_pow2(head_dim // 2))
        return qkv[:, :q_width].view(tokens, q_heads, head_dim)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        from rempd.model import fused_kernels

        assert gate_up.stride(-1) == 1
        tokens, width = gate_up.shape[0], gate_up.shape[-1] // 2
        out = torch.empty(tokens, width, dtype=gate_up.dtype, device=gate_up.device)
        block = min(_pow2(width), 1024)
        if tokens:
            fused_kernels.silu_mul[(tokens, -(-width // block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                                  WIDTH=width, BLOCK=block)
        return out


def ops_for(meta: AttentionMetadata | KernelMetadata) -> type[ReferenceOps]:
    fused = isinstance(meta, KernelMetadata) and os.environ.get("REMPD_FUSED_OPS", "1") != "0"
    return FusedOps if fused else ReferenceOps
