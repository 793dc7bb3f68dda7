"""A Hugging Face safetensors checkpoint: which tensors it must hold, checked before any is read."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rempd.model.config import CheckpointError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weights we can cast to the serving dtype; integer or float8 tensors would mean a quantised
# checkpoint, which the model code does not understand.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in the order iter_tensors yields them, with HF names."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    # ModelConfig allows attention_bias for Qwen2 only, which biases q/k/v but not o_proj.
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, h)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, as its file's header says."""
    name: str
    file: Path
    shape: tuple[int, ...]
    file_dtype: str  # safetensors code, e.g. "BF16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """Reads config.json and one or more safetensors files; validates headers before any data.

    With strict (the default) a tensor the model would not use is an error: it usually means a
    variant we do not implement (MLP biases, another naming), whose weights would be silently lost.
    Rotary inv_freq buffers and a tied lm_head.weight are always skipped.
    """

    def __init__(self, model_dir: str | Path, strict: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self.strict = strict
        self.config = ModelConfig.from_dir(self.model_dir)
        self._weight_map = self._read_index()
        self.files = self._find_files()
        self._tensors: dict[str, TensorInfo] | None = None

    def _read_index(self) -> dict[str, str] | None:
        if (self.model_dir / SINGLE_FILE).is_file():
            return None  # like transformers: a single file wins over a (possibly stale) index
        path = self.model_dir / INDEX_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors index: {exc}") from exc
        return weight_map

    def _find_files(self) -> list[Path]:
        if self._weight_map is None:
            return [self.model_dir / SINGLE_FILE]
        files = [self.model_dir / name for name in sorted(set(self._weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
        return files

    def validate(self) -> None:
        """Check every file header, name and shape; reads no tensor data. Idempotent."""
        if self._tensors is not None:
            return
        found: dict[str, TensorInfo] = {}
        for path in self.files:
            for info in _read_header(path):
                if info.name in found:
                    raise CheckpointError(
                        f"tensor {info.name} appears in both {found[info.name].file} and {path}")
                found[info.name] = info
        self._check_weight_map(found)
        expected = expected_shapes(self.config)
        missing = [name for name in expected if name not in found]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.model_dir}: missing tensor {missing[0]}{more}")
        for name, shape in expected.items():
            info = found[name]
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
            if info.file_dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} has unsupported dtype {info.file_dtype}")
        unknown = [n for n in found if n not in expected and not self._skippable(n)]
        if unknown and self.strict:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise CheckpointError(f"{found[unknown[0]].file}: unexpected tensor {unknown[0]}{more} "
                                  f"for {self.config.architecture}")
        self._tensors = {name: found[name] for name in expected}

    def _skippable(self, name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or (
            name == "lm_head.weight" and self.config.tie_word_embeddings)

    def _check_weight_map(self, found: dict[str, TensorInfo]) -> None:
        if self._weight_map is None:
            return
        for name, file_name in self._weight_map.items():
            info = found.get(name)
            if info is None or info.file.name != file_name:
                raise CheckpointError(f"{self.model_dir / file_name}: has no tensor {name}, "
                                      f"which {INDEX_FILE} says it holds")

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """The tensors iter_tensors yields, in its order (validates first)."""
        self.validate()
        assert self._tensors is not None
        return dict(self._tensors)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    @property
    def total_bytes(self) -> int:
        """Bytes of the served tensors once cast to the config's dtype (what a store must hold)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(info.numel for info in self.tensors.values()) * itemsize

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every served tensor, as a weight store must lay them out."""
        return [(name, info.shape, self.config.dtype) for name, info in self.tensors.items()]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every expected tensor, cast to the config's dtype, one at a time.

        Validation happens here, at the call, so a bad checkpoint fails before any tensor is read.
        """
        return self._stream(self.tensors, self.dtype)

    @staticmethod
    def _stream(tensors: dict[str, TensorInfo], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for name, info in tensors.items():
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(_open(info.file))
                try:
                    tensor = handles[info.file].get_tensor(name)  # type: ignore[attr-defined]
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise CheckpointError(f"{info.file}: cannot read tensor {name}: {exc}") from exc
                yield name, tensor if tensor.dtype == dtype else tensor.to(dtype)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def _read_header(path: Path) -> list[TensorInfo]:
    # safe_open checks that the header parses and that its offsets cover the file exactly, which
    # is what catches a truncated download or copy.
    with _open(path) as handle:
        infos = []
        for name in handle.keys():
            piece = handle.get_slice(name)
            infos.append(TensorInfo(name, path, tuple(piece.get_shape()), piece.get_dtype()))
        return infos
