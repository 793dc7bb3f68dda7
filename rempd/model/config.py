"""The model's shape, read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = ("float32", "float16", "bfloat16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be served; the message names the file or tensor."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
            # transformers 5 writes rope_parameters; older configs rope_theta and rope_scaling
            rope = dict(raw.get("rope_parameters") or {})
            rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
            rope_scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if raw.get("mlp_bias"):
                raise CheckpointError(f"{source}: mlp_bias is not supported")
            window = raw.get("sliding_window")
            uses_window = raw.get("use_sliding_window", arch == "MistralForCausalLM")
            if window and uses_window and int(window) < int(raw.get("max_position_embeddings", 4096)):
                raise CheckpointError(f"{source}: sliding-window attention ({window} tokens) is not supported")
            if int(raw.get("num_attention_heads") or 0) <= 0:
                raise CheckpointError(f"{source}: num_attention_heads must be positive")
            if dtype not in DTYPES:
                raise CheckpointError(f"{source}: unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
            cfg = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                # Qwen2 always has q/k/v biases, whatever its config says
                attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=dtype,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source}: missing or invalid field: {exc}") from exc
        cfg.validate(source)
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_dict(raw, str(path))

    def validate(self, source: str) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {self.num_heads} "
                                  f"is not a multiple of num_key_value_heads {self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"{source}: {name} must be positive")
        if self.attention_bias and self.architecture != "Qwen2ForCausalLM":
            raise CheckpointError(f"{source}: attention_bias is supported for Qwen2 only")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (
                "llama3", "default", None):
            raise CheckpointError(f"{source}: unsupported rope_scaling {self.rope_scaling}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
