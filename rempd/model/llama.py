"""One pipeline stage of a Llama-family model (Llama 2/3, Mistral, Qwen2) on one tensor-parallel rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rempd.model.attention import AttentionMetadata
from rempd.model.config import ModelConfig
from rempd.model.fused_ops import ReferenceOps, ops_for
from rempd.model.layers import TensorParallel, row_parallel, vocab_parallel_embedding
from rempd.model.paged_attention import KernelMetadata
from rempd.model.rotary import Rotary
from rempd.model.sharding import even_range, shard_rows
from rempd.model.weight_source import WeightSource


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, tp: TensorParallel, source: WeightSource):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        p = f"model.layers.{index}."

        def rows(*names: str) -> torch.Tensor:
            return source.take(*[(p + n, shard_rows(p + n, cfg, tp.size, tp.rank)) for n in names])

        self.input_norm = rows("input_layernorm.weight")
        self.post_norm = rows("post_attention_layernorm.weight")
        q_rows = shard_rows(p + "self_attn.q_proj.weight", cfg, tp.size, tp.rank)
        kv_rows = shard_rows(p + "self_attn.k_proj.weight", cfg, tp.size, tp.rank)
        self.q_local, self.kv_local = q_rows[1] - q_rows[0], kv_rows[1] - kv_rows[0]
        self.qkv = rows("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
        self.qkv_bias = (rows("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
                         if cfg.attention_bias else None)
        self.o_t = rows("self_attn.o_proj.weight")
        self.gate_up = rows("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.down_t = rows("mlp.down_proj.weight")
        self.scale = cfg.head_dim ** -0.5
        # each checkpoint tensor's rows as views into the fused tensors: what a switch reads from
        q, kv, inter = self.q_local, self.kv_local, self.gate_up.shape[0] // 2
        views = {"input_layernorm.weight": self.input_norm, "post_attention_layernorm.weight": self.post_norm,
                 "self_attn.q_proj.weight": self.qkv[:q], "self_attn.k_proj.weight": self.qkv[q:q + kv],
                 "self_attn.v_proj.weight": self.qkv[q + kv:], "self_attn.o_proj.weight": self.o_t,
                 "mlp.gate_proj.weight": self.gate_up[:inter], "mlp.up_proj.weight": self.gate_up[inter:],
                 "mlp.down_proj.weight": self.down_t}
        if self.qkv_bias is not None:
            views |= {"self_attn.q_proj.bias": self.qkv_bias[:q], "self_attn.k_proj.bias": self.qkv_bias[q:q + kv],
                      "self_attn.v_proj.bias": self.qkv_bias[q + kv:]}
        self.views = {p + name: t for name, t in views.items()}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, rotary: Rotary,
                kv: torch.Tensor, meta: AttentionMetadata | KernelMetadata,
                ops: type[ReferenceOps]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, residual: the stream before it (None for a stage's first layer).
        Returns this layer's output and the stream it is to be added to."""
        eps, hd = self.cfg.rms_norm_eps, self.cfg.head_dim
        h, residual = ops.add_rms_norm(x, residual, self.input_norm, eps)
        q = ops.rotate_and_store(F.linear(h, self.qkv, self.qkv_bias), positions, rotary, meta, kv, self.q_local,
                                 self.kv_local, hd)
        attn = meta.attend(q, kv[0], kv[1], self.scale)
        h, residual = ops.add_rms_norm(row_parallel(attn.flatten(1), self.o_t, self.tp), residual, self.post_norm,
                                       eps)
        return row_parallel(ops.silu_mul(F.linear(h, self.gate_up)), self.down_t, self.tp), residual


class LlamaStage(nn.Module):
    """Layers `layers` of the model; the first stage embeds, the last one normalises and projects to logits."""

    def __init__(self, cfg: ModelConfig, layers: range, is_first: bool, is_last: bool, tp: TensorParallel,
                 source: WeightSource, max_len: int, device: torch.device, order: list[int] | None = None):
        """order: the model's parts in the order to build them (0 the embedding, 1 + i layer i, num_layers + 1
        the final norm and head), of which this stage builds its own; a layer-ordered switch sets it."""
        super().__init__()
        self.cfg, self.tp, self.layer_ids = cfg, tp, layers
        self.is_first, self.is_last = is_first, is_last
        self.vocab_start, _ = even_range(cfg.vocab_size, tp.size, tp.rank)
        vocab_rows = shard_rows("model.embed_tokens.weight", cfg, tp.size, tp.rank)
        head = cfg.num_layers + 1
        mine = [0] * is_first + [1 + i for i in layers] + [head] * is_last
        self.embed = self.norm = self.lm_head = None
        built: dict[int, DecoderLayer] = {}
        for unit in mine if order is None else [u for u in order if u in mine]:
            if unit == 0:
                self.embed = source.take(("model.embed_tokens.weight", vocab_rows))
            elif unit == head:
                self.norm = source.take(("model.norm.weight", (0, cfg.hidden_size)))
                if not (is_first and cfg.tie_word_embeddings):
                    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
                    self.lm_head = source.take((name, vocab_rows))
            else:
                built[unit - 1] = DecoderLayer(cfg, unit - 1, tp, source)
        if is_last and is_first and cfg.tie_word_embeddings:
            self.lm_head = self.embed
        self.layers = [built[i] for i in layers]
        self.rotary = Rotary(cfg, max_len, device)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Checkpoint name → the rows of it this stage holds (views, no copies)."""
        views = {name: t for layer in self.layers for name, t in layer.views.items()}
        if self.embed is not None:
            views["model.embed_tokens.weight"] = self.embed
        if self.is_last:
            views["model.norm.weight"] = self.norm
            views["model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"] = self.lm_head
        return views

    def weight_bytes(self) -> int:
        """Bytes of the distinct tensors this stage holds; a tied head shares the embedding, counted once."""
        seen: dict[int, torch.Tensor] = {}
        for obj in [self, *self.layers]:
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor):
                    seen.setdefault(id(value), value)
        return sum(t.numel() * t.element_size() for t in seen.values())

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata | KernelMetadata, sample_indices: torch.Tensor) -> torch.Tensor:
        """inputs: token ids on the first stage, else the previous stage's hidden states.

        Returns hidden states, or on the last stage the full-vocabulary logits of the sampled rows."""
        x = vocab_parallel_embedding(inputs, self.embed, self.vocab_start, self.tp) if self.is_first else inputs
        # the Triton kernel path runs the layers' small ops fused too; the reference path stays plain PyTorch
        ops = ops_for(meta)
        residual = None
        for local, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[local], meta, ops)
        if not self.is_last:
            return ops.add(x, residual)
        x, _ = ops.add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps, rows=sample_indices)
        return self.tp.gather_columns(F.linear(x, self.lm_head).float(), self.cfg.vocab_size)
