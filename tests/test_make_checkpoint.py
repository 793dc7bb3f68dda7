"""The checkpoint generator: shapes table, determinism, HF compatibility, tokenizer size."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rempd.model.checkpoint import INDEX_FILE, Checkpoint
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import (BOS_ID, EOS_ID, IM_END_ID, SHAPES, build_tokenizer,
                                         make_checkpoint, make_checkpoint_command, shape_config)
from rempd.model.tokenizer import Tokenizer

TINY = ("tiny-llama", "tiny-qwen2", "tiny-llama8")


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_checkpoint(name, root / name) for name in TINY}


@pytest.mark.parametrize("shape, dims", [
    ("llama2-7b", dict(architecture="LlamaForCausalLM", hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       attention_bias=False, tie_word_embeddings=False, dtype="bfloat16", head_dim=128)),
    ("qwen2.5-32b", dict(architecture="Qwen2ForCausalLM", hidden_size=5120, intermediate_size=27648,
                         num_layers=64, num_heads=40, num_kv_heads=8, vocab_size=152064,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                         attention_bias=True, dtype="bfloat16", head_dim=128)),
    ("llama2-70b", dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                        num_kv_heads=8, vocab_size=32000, dtype="bfloat16")),
    ("llama3-1b", dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, vocab_size=128256, rope_theta=500000.0,
                       tie_word_embeddings=True, head_dim=64)),
    ("tiny-llama", dict(architecture="LlamaForCausalLM", hidden_size=64, num_layers=4, num_heads=4,
                        num_kv_heads=2, dtype="float32", attention_bias=False)),
    ("tiny-qwen2", dict(architecture="Qwen2ForCausalLM", hidden_size=64, intermediate_size=160,
                        num_layers=5, num_heads=4, num_kv_heads=2, attention_bias=True,
                        tie_word_embeddings=True, dtype="float32")),
    ("tiny-llama8", dict(architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=8,
                         num_heads=8, num_kv_heads=4, head_dim=8, dtype="float32")),
])
def test_shapes_table_dims(shape: str, dims: dict) -> None:
    cfg = ModelConfig.from_dict(shape_config(shape))
    for key, value in dims.items():
        assert getattr(cfg, key) == value, key
    assert cfg.bos_token_id == BOS_ID and cfg.eos_token_ids == (EOS_ID, IM_END_ID)


def test_llama3_rope_scaling() -> None:
    assert shape_config("llama3-1b")["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert shape_config("tiny-llama")["rope_scaling"]["rope_type"] == "llama3"


def test_unknown_shape_and_dtype() -> None:
    with pytest.raises(ValueError, match="unknown shape 'gpt-5'"):
        shape_config("gpt-5")
    with pytest.raises(ValueError, match="unsupported dtype"):
        shape_config("tiny-llama", dtype="int8")


def test_shape_from_transformers5_config(tmp_path: Path) -> None:
    # transformers 5 saves rope_theta and rope_scaling inside rope_parameters, and "dtype".
    raw = {"architectures": ["MistralForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
           "vocab_size": 300, "dtype": "float32", "rope_parameters": {
               "rope_theta": 123.0, "rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    (tmp_path / "src.json").write_text(json.dumps(raw))
    config = shape_config(str(tmp_path / "src.json"))
    assert config["rope_theta"] == 123.0 and config["rope_scaling"]["factor"] == 2.0
    out = make_checkpoint(str(tmp_path / "src.json"), tmp_path / "ck")
    cfg = Checkpoint(out).config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == ("MistralForCausalLM", 32, 1, 300)
    assert Tokenizer.from_dir(out).vocab_size == 300


@pytest.mark.parametrize("shape", TINY)
def test_loads_in_transformers(tiny: dict[str, Path], shape: str) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tiny[shape], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == SHAPES[shape].vocab_size
    ids = torch.tensor([Tokenizer.from_dir(tiny[shape]).encode("The quick brown fox")])
    logits = model(ids).logits
    # Unit-scale logits: a peaked but not degenerate distribution.
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny[shape])
    assert hf_tok("héllo wörld 😀")["input_ids"] == Tokenizer.from_dir(tiny[shape]).encode("héllo wörld 😀")


def test_same_seed_same_bytes(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = make_checkpoint("tiny-llama", tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny["tiny-llama"])
    other = make_checkpoint("tiny-llama", tmp_path / "other", seed=1)
    assert _digests(other)["model.safetensors"] != _digests(again)["model.safetensors"]
    assert _digests(other)["tokenizer.json"] == _digests(again)["tokenizer.json"]


def test_sharded_output_is_layout_independent(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = make_checkpoint("tiny-qwen2", tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    sharded = dict(Checkpoint(out).iter_tensors())
    single = dict(Checkpoint(tiny["tiny-qwen2"]).iter_tensors())
    assert index["metadata"]["total_size"] == Checkpoint(out).total_bytes
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)  # values come from names, not shards


def test_weight_statistics(tiny: dict[str, Path]) -> None:
    tensors = dict(Checkpoint(tiny["tiny-qwen2"]).iter_tensors())
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert abs(norm.mean().item() - 1) < 0.05 and norm.std().item() > 0
    bias = tensors["model.layers.0.self_attn.q_proj.bias"]
    assert bias.abs().max().item() > 0 and bias.std().item() < 0.3
    down = tensors["model.layers.0.mlp.down_proj.weight"]
    assert abs(down.std().item() - 160 ** -0.5) < 0.01


def test_dtype_override(tmp_path: Path) -> None:
    out = make_checkpoint("tiny-llama", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.norm.weight").get_dtype() == "BF16"


@pytest.mark.parametrize("shape", TINY)
def test_every_id_decodes(tiny: dict[str, Path], shape: str) -> None:
    tok = Tokenizer.from_dir(tiny[shape])
    assert tok.vocab_size == SHAPES[shape].vocab_size
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    assert all(tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size))


def test_large_vocab_is_exact() -> None:
    for size in (32000, 152064):
        assert build_tokenizer(size, add_bos=True).get_vocab_size() == size
    with pytest.raises(ValueError, match="below"):
        build_tokenizer(100, add_bos=False)


def test_command(tmp_path: Path) -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("make-checkpoint")(make_checkpoint_command)
    app.command("other")(lambda: None)  # two commands, so that typer keeps the subcommand name
    result = CliRunner().invoke(app, ["make-checkpoint", "--shape", "tiny-qwen2",
                                      "--out", str(tmp_path / "ck"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "ck" / "config.json").is_file()
    bad = CliRunner().invoke(app, ["make-checkpoint", "--shape", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0
