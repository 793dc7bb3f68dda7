"""Checkpoint: expected tensors, streaming, and errors that name the file or tensor."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rempd.model.checkpoint import INDEX_FILE, Checkpoint, expected_shapes
from rempd.model.config import CheckpointError, ModelConfig
from rempd.model.make_checkpoint import make_checkpoint, shape_config


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generated")
    return {
        "tiny-llama": make_checkpoint("tiny-llama", root / "tiny-llama"),
        "tiny-qwen2": make_checkpoint("tiny-qwen2", root / "tiny-qwen2"),
        "sharded": make_checkpoint("tiny-llama", root / "sharded", max_shard_bytes=300_000),
    }


@pytest.fixture
def copy(generated: dict[str, Path], tmp_path: Path):
    """A private copy of a generated checkpoint, free to damage."""
    def make(name: str) -> Path:
        return Path(shutil.copytree(generated[name], tmp_path / name))
    return make


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "sharded"])
def test_iter_tensors_yields_every_expected_tensor(generated: dict[str, Path], name: str) -> None:
    ck = Checkpoint(generated[name])
    expected = expected_shapes(ck.config)
    got = list(ck.iter_tensors())
    assert [n for n, _ in got] == list(expected)  # stable order, each exactly once
    for n, tensor in got:
        assert tuple(tensor.shape) == expected[n] and tensor.dtype == torch.float32
    assert ck.total_bytes == sum(t.numel() for _, t in got) * 4


def test_qwen2_layout() -> None:
    cfg = ModelConfig.from_dict(shape_config("tiny-qwen2"))
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.4.self_attn.q_proj.bias"] == (64,)
    assert shapes["model.layers.4.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert "lm_head.weight" not in shapes  # tied


def test_big_shapes_without_files() -> None:
    shapes = expected_shapes(ModelConfig.from_dict(shape_config("llama2-70b")))
    assert len(shapes) == 1 + 80 * 9 + 2
    assert shapes["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (8192, 8192)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
    assert shapes["lm_head.weight"] == (32000, 8192)


def test_mistral_has_no_biases() -> None:
    mistral = shape_config("tiny-qwen2") | {"architectures": ["MistralForCausalLM"], "attention_bias": False}
    shapes = expected_shapes(ModelConfig.from_dict(mistral))
    assert not any(n.endswith(".bias") for n in shapes) and len(shapes) == 1 + 5 * 9 + 1


def test_cast_to_config_dtype(copy) -> None:
    ck_dir = copy("tiny-llama")
    raw = json.loads((ck_dir / "config.json").read_text())
    (ck_dir / "config.json").write_text(json.dumps(raw | {"torch_dtype": "bfloat16"}))
    ck = Checkpoint(ck_dir)
    assert all(t.dtype == torch.bfloat16 for _, t in ck.iter_tensors())
    assert ck.total_bytes == sum(info.numel for info in ck.tensors.values()) * 2


def test_tied_lm_head_and_inv_freq_are_skipped(copy) -> None:
    ck_dir = copy("tiny-qwen2")

    def add_extras(t: dict) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _rewrite(ck_dir / "model.safetensors", add_extras)
    names = [n for n, _ in Checkpoint(ck_dir).iter_tensors()]
    assert "lm_head.weight" not in names and not any("inv_freq" in n for n in names)


def test_unknown_tensor(copy) -> None:
    ck_dir = copy("tiny-llama")
    _rewrite(ck_dir / "model.safetensors",
             lambda t: t.__setitem__("model.layers.0.mlp.up_proj.bias", torch.zeros(128)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.up_proj\.bias"):
        Checkpoint(ck_dir).validate()
    assert len(list(Checkpoint(ck_dir, strict=False).iter_tensors())) == 39


def test_unknown_architecture(copy) -> None:
    ck_dir = copy("tiny-llama")
    raw = json.loads((ck_dir / "config.json").read_text())
    (ck_dir / "config.json").write_text(json.dumps(raw | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture 'GPT2LMHeadModel'"):
        Checkpoint(ck_dir)


def test_missing_config(copy) -> None:
    ck_dir = copy("tiny-llama")
    (ck_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: no such file"):
        Checkpoint(ck_dir)


def test_no_weights(copy) -> None:
    ck_dir = copy("tiny-llama")
    (ck_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        Checkpoint(ck_dir)


def test_missing_shard(copy) -> None:
    ck_dir = copy("sharded")
    (ck_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: shard listed in .* is missing"):
        Checkpoint(ck_dir)


def test_index_names_a_tensor_its_file_lacks(copy) -> None:
    ck_dir = copy("sharded")
    index = json.loads((ck_dir / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (ck_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors: has no tensor model\.norm\.weight"):
        Checkpoint(ck_dir).validate()


def test_truncated_file_fails_before_any_tensor_is_read(copy) -> None:
    ck_dir = copy("sharded")
    last = ck_dir / "model-00003-of-00003.safetensors"
    last.write_bytes(last.read_bytes()[:-1000])
    ck = Checkpoint(ck_dir)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors: not a readable safetensors file"):
        ck.iter_tensors()  # raises at the call: the first shard's tensors are never yielded


def test_corrupt_header(copy) -> None:
    ck_dir = copy("tiny-llama")
    (ck_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Checkpoint(ck_dir).validate()


def test_wrong_shape(copy) -> None:
    ck_dir = copy("tiny-qwen2")
    _rewrite(ck_dir / "model.safetensors",
             lambda t: t.__setitem__("model.layers.2.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor model\.layers\.2\.self_attn\.k_proj\.weight has shape \[64, 64\], expected \[32, 64\]"):
        Checkpoint(ck_dir).validate()


def test_missing_tensor(copy) -> None:
    ck_dir = copy("tiny-qwen2")
    _rewrite(ck_dir / "model.safetensors", lambda t: t.pop("model.layers.3.self_attn.v_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.3\.self_attn\.v_proj\.bias"):
        Checkpoint(ck_dir).iter_tensors()


def test_integer_tensor_is_refused(copy) -> None:
    ck_dir = copy("tiny-llama")
    _rewrite(ck_dir / "model.safetensors",
             lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has unsupported dtype I8"):
        Checkpoint(ck_dir).validate()


@pytest.mark.parametrize("change, reason", [
    ({"mlp_bias": True}, "mlp_bias is not supported"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, "sliding-window attention"),
    ({"num_attention_heads": 0}, "num_attention_heads must be positive"),
])
def test_unsupported_config_variants_are_refused(change, reason):
    raw = shape_config("tiny-llama") | change
    with pytest.raises(CheckpointError, match=reason):
        ModelConfig.from_dict(raw)
