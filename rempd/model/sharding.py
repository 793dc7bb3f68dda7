"""Which rows of a stored tensor belong to a tensor-parallel rank: a pure function of name and topology.

The weight store keeps row-parallel weights (o_proj, down_proj) transposed, so every slice below is a
contiguous range of rows of the stored tensor, for every tp degree.
"""
from __future__ import annotations

from rempd.model.config import ModelConfig
from rempd.topology import kv_head_range

ROW_PARALLEL_SUFFIXES = ("o_proj.weight", "down_proj.weight")


def is_row_parallel(name: str) -> bool:
    return name.endswith(ROW_PARALLEL_SUFFIXES)


def even_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Near-equal contiguous split; every part but the last has ceil(total / parts) rows."""
    per = -(-total // parts)
    return min(total, index * per), min(total, (index + 1) * per)


def shard_rows(name: str, cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int]:
    """Row range [start, stop) of the stored tensor `name` that rank `tp_rank` of `tp` holds."""
    leaf = name.rsplit(".", 2)[-2]  # e.g. "q_proj" from "...self_attn.q_proj.weight"
    if leaf in ("q_proj", "o_proj"):
        per = cfg.q_size // tp
        return tp_rank * per, (tp_rank + 1) * per
    if leaf in ("k_proj", "v_proj"):
        heads = kv_head_range(cfg.num_kv_heads, tp, tp_rank)
        return heads.start * cfg.head_dim, heads.stop * cfg.head_dim
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return even_range(cfg.intermediate_size, tp, tp_rank)
    if leaf in ("embed_tokens", "lm_head"):
        return even_range(cfg.vocab_size, tp, tp_rank)
    # norms are replicated
    dim0 = cfg.hidden_size
    return 0, dim0


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def fused_name(name: str) -> str:
    """The one allocation a stage keeps this stored tensor's rows in: LlamaStage fuses q, k and v (weights and
    biases) and gate and up."""
    for parts, fused in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"), "gate_up")):
        for part in parts:
            if f".{part}." in name:
                return name.replace(part, fused)
    return name


def stage_tensor_names(cfg: ModelConfig, layers: range, is_first: bool, is_last: bool) -> list[str]:
    """HF tensor names a pipeline stage needs."""
    names = []
    if is_first or (is_last and cfg.tie_word_embeddings):
        names.append("model.embed_tokens.weight")
    for i in layers:
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
        if cfg.attention_bias:
            names += [f"{p}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        names += [f"{p}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    if is_last:
        names.append("model.norm.weight")
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
    return names
