"""Synthetic checkpoints in Hugging Face layout: real architectures' shapes, seeded random weights.

There is no model hub on our machines, so tests and benchmarks serve checkpoints written here:
config.json, safetensors (sharded above MAX_SHARD_BYTES), a byte-level BPE tokenizer whose size is
exactly the model's vocabulary, and a ChatML-like chat template. Same seed, same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Optional

import torch
import typer
from safetensors import SafetensorError
from safetensors.torch import save_file

from rempd.model.checkpoint import INDEX_FILE, SINGLE_FILE, expected_shapes
from rempd.model.config import DTYPES, ModelConfig
from rempd.model.synthetic_tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, IM_END_ID, build_tokenizer

MAX_SHARD_BYTES = 5 * 10**9
CHUNK_ELEMENTS = 1 << 22  # random numbers per generator: chunks fill in parallel, in any order


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # a dict's items, to stay immutable
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    head_dim: int | None = None


def _llama3_rope(factor: float, original_max: int) -> tuple[tuple[str, Any], ...]:
    return (("rope_type", "llama3"), ("factor", factor), ("low_freq_factor", 1.0),
            ("high_freq_factor", 4.0), ("original_max_position_embeddings", original_max))


SHAPES: MappingProxyType[str, Shape] = MappingProxyType({
    "llama2-7b": Shape("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000),
    "llama2-70b": Shape("LlamaForCausalLM", 8192, 28672, 80, 64, 8, 32000),
    "qwen2.5-32b": Shape("Qwen2ForCausalLM", 5120, 27648, 64, 40, 8, 152064, 32768, 1e-6, 1e6,
                         attention_bias=True),
    "llama3-1b": Shape("LlamaForCausalLM", 2048, 8192, 16, 32, 8, 128256, 131072, 1e-5, 500000.0,
                       _llama3_rope(32.0, 8192), tie_word_embeddings=True),
    # head_dim 16 at theta 1e4 with an original context of 256 puts the rotary frequencies in all
    # three llama3 bands (kept, smoothed, divided by factor), so that path is exercised on CPU.
    "tiny-llama": Shape("LlamaForCausalLM", 64, 128, 4, 4, 2, 512, 512, 1e-5, 10000.0,
                        _llama3_rope(8.0, 256), dtype="float32"),
    "tiny-qwen2": Shape("Qwen2ForCausalLM", 64, 160, 5, 4, 2, 512, 512, 1e-6, 1e6,
                        attention_bias=True, tie_word_embeddings=True, dtype="float32"),
    # Splits every way over 8 devices (TP1PP8 … TP8PP1); 4 KV heads so that TP8 replicates each over two ranks.
    "tiny-llama8": Shape("LlamaForCausalLM", 64, 128, 8, 8, 4, 512, 512, 1e-5, 10000.0, dtype="float32"),
})

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def shape_config(shape: str, dtype: str | None = None) -> dict[str, Any]:
    """The config.json for a named shape, or for the dims of an existing config.json's path."""
    if shape in SHAPES:
        spec = SHAPES[shape]
    elif shape.endswith(".json") and Path(shape).is_file():
        spec = _shape_from_file(Path(shape))
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)} or a config.json path")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        spec = replace(spec, dtype=dtype)
    config: dict[str, Any] = {
        "architectures": [spec.architecture], "model_type": _MODEL_TYPES.get(spec.architecture),
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim or spec.hidden_size // spec.num_heads,
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
        "attention_bias": spec.attention_bias, "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0,
        "torch_dtype": spec.dtype, "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID],
        "use_cache": True,
    }
    if spec.architecture == "LlamaForCausalLM":
        config["mlp_bias"] = False
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    ModelConfig.from_dict(config, source=shape)  # the server must accept what we write
    return config


def _shape_from_file(path: Path) -> Shape:
    raw = json.loads(path.read_text())
    cfg = ModelConfig.from_dict(raw, str(path))
    return Shape(
        cfg.architecture, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
        cfg.num_kv_heads, cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps,
        cfg.rope_theta, tuple(sorted(cfg.rope_scaling.items())) if cfg.rope_scaling else None,
        cfg.attention_bias, cfg.tie_word_embeddings,
        cfg.dtype if raw.get("torch_dtype") or raw.get("dtype") else "bfloat16", cfg.head_dim)


def _tensor_seed(seed: int, name: str, chunk: int) -> int:
    # Derived from the tensor's name, so values do not depend on shard layout or fill order.
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _init_stats(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's random values."""
    # Matrices get std 1/sqrt(fan_in) so that projections keep unit scale: q·k scores then vary
    # enough that attention is far from uniform, which makes RoPE or masking bugs visible even
    # in the tiny models. Norm weights sit near 1; biases are small but nonzero.
    if name.endswith("norm.weight"):
        return 1.0, 0.02
    if name.endswith(".bias"):
        return 0.0, 0.1
    return 0.0, shape[-1] ** -0.5


def _random_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int,
                    pool: ThreadPoolExecutor) -> dict[str, torch.Tensor]:
    tensors = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}

    def fill(job: tuple[str, int]) -> None:
        name, chunk = job
        target = tensors[name].view(-1)[chunk * CHUNK_ELEMENTS:(chunk + 1) * CHUNK_ELEMENTS]
        mean, std = _init_stats(name, shapes[name])
        generator = torch.Generator().manual_seed(_tensor_seed(seed, name, chunk))
        # float32 sampling and a cast is ~3x faster than sampling in bfloat16 on CPU.
        target.copy_(torch.empty(target.numel()).normal_(mean, std, generator=generator))

    # Every chunk of the shard at once, so that small tensors do not leave cores idle.
    jobs = [(n, c) for n, t in tensors.items() for c in range(math.ceil(t.numel() / CHUNK_ELEMENTS))]
    list(pool.map(fill, jobs))
    return tensors


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def make_checkpoint(shape: str, out_dir: str | Path, seed: int = 0, dtype: str | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a complete checkpoint to out_dir and return its path. config.json is written last,
    so an interrupted run leaves a directory that no loader mistakes for a checkpoint."""
    config = shape_config(shape, dtype)
    cfg = ModelConfig.from_dict(config, source=shape)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "config.json", out / INDEX_FILE, *out.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)
    before = {p.name for p in out.iterdir()}
    try:
        _write(config, cfg, out, seed, max_shard_bytes)
    except (OSError, SafetensorError) as exc:  # disk full, a quota, a read-only mount: leave nothing partial
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for path in out.iterdir():
                if path.name not in before and path.is_file():
                    path.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CheckpointWriteError(f"cannot write the checkpoint to {out}: {reason}; nothing was left there") \
            from exc
    return out


class CheckpointWriteError(OSError):
    """Writing failed part-way; what was written has been removed."""


def _write(config: dict[str, Any], cfg: ModelConfig, out: Path, seed: int, max_shard_bytes: int) -> None:
    torch_dtype = getattr(torch, cfg.dtype)
    shapes = expected_shapes(cfg)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, names in enumerate(shards):
            file_name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = _random_tensors({n: shapes[n] for n in names}, torch_dtype, seed, pool)
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            # save_file writes through a private temp file (mode 0600); a daemon running as
            # another user must still be able to read the weights.
            (out / file_name).chmod(0o644)
            weight_map.update(dict.fromkeys(names, file_name))
            del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * itemsize
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    add_bos = cfg.architecture != "Qwen2ForCausalLM"  # as the real tokenizers do
    build_tokenizer(cfg.vocab_size, add_bos).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE})
    _write_json(out / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]})
    _write_json(out / "config.json", config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_checkpoint_command(
    shape: Annotated[str, typer.Option(help=f"one of {', '.join(SHAPES)}, or a config.json path")],
    out: Annotated[Path, typer.Option(help="directory to write the checkpoint into")],
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16")] = None,
) -> None:
    """Write a checkpoint with a real model's shapes and seeded random weights."""
    start = time.perf_counter()
    try:
        path = make_checkpoint(shape, out, seed=seed, dtype=dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except CheckpointWriteError as exc:
        typer.echo(f"rempd make-checkpoint: {exc}", err=True)
        raise typer.Exit(1) from None
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    typer.echo(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
