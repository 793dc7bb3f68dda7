"""Tokenizer wrapper: round trips, special tokens, chat template, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers

from rempd.model.config import CheckpointError
from rempd.model.make_checkpoint import BOS_ID, EOS_ID, make_checkpoint
from rempd.model.tokenizer import Tokenizer

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n",
         "café naïve 日本語 😀👍🏽", "", "x" * 300]
SPECIAL_TEXT = "<|im_start|> in text is the special token, as in transformers"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: make_checkpoint(name, root / name) for name in ("tiny-llama", "tiny-qwen2")}


@pytest.fixture(scope="module")
def llama(dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_dir(dirs["tiny-llama"])


@pytest.fixture(scope="module")
def qwen(dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_dir(dirs["tiny-qwen2"])


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(llama: Tokenizer, qwen: Tokenizer, text: str) -> None:
    for tok in (llama, qwen):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(SPECIAL_TEXT), skip_special_tokens=False).endswith(SPECIAL_TEXT)


def test_bos(llama: Tokenizer, qwen: Tokenizer) -> None:
    assert llama.encode("hi")[0] == BOS_ID and llama.encode("")[:1] == [BOS_ID]
    assert llama.encode("hi", add_special_tokens=False)[0] != BOS_ID
    assert BOS_ID not in qwen.encode("hi")  # Qwen-style: no BOS
    assert llama.decode([BOS_ID, *llama.encode("hi", add_special_tokens=False)], skip_special_tokens=False) == "<s>hi"


def test_add_bos_token_without_post_processor(dirs: dict[str, Path]) -> None:
    backend = tokenizers.Tokenizer.from_file(str(dirs["tiny-qwen2"] / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", add_bos_token=True)
    assert tok.encode("hi")[0] == BOS_ID and tok.encode("hi")[1] != BOS_ID
    assert tok.encode("<s>hi").count(BOS_ID) == 1  # no second BOS when the text starts with one


def test_properties(llama: Tokenizer) -> None:
    assert (llama.bos_token_id, llama.eos_token_id, llama.vocab_size) == (BOS_ID, EOS_ID, 512)


def test_chat_template(llama: Tokenizer) -> None:
    assert llama.apply_chat_template(CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n")
    assert llama.apply_chat_template(CHAT, add_generation_prompt=False).endswith("Hi 😀<|im_end|>\n")
    with pytest.raises(ValueError, match="chat template: unsupported role: robot"):
        llama.apply_chat_template([{"role": "robot", "content": "beep"}])
    ids = llama.encode(llama.apply_chat_template(CHAT), add_special_tokens=False)
    assert ids[0] == 3  # <|im_start|> is one special token, not its characters
    assert llama.decode(ids, skip_special_tokens=False) == llama.apply_chat_template(CHAT)


def test_matches_transformers(dirs: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("tiny-llama", "tiny-qwen2"):
        hf = transformers.AutoTokenizer.from_pretrained(dirs[name])
        mine = Tokenizer.from_dir(dirs[name])
        for text in [*TEXTS, SPECIAL_TEXT]:
            assert hf(text)["input_ids"] == mine.encode(text), (name, text)
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == mine.apply_chat_template(CHAT)


def test_hf_template_helpers(dirs: dict[str, Path]) -> None:
    backend = tokenizers.Tokenizer.from_file(str(dirs["tiny-llama"] / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}{% endfor %}")
    tok = Tokenizer(backend, bos_token="<s>", chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}, {"role": "x"}]) == '<s>{"role": "user", "content": "é"}'


def test_sandboxed(dirs: dict[str, Path]) -> None:
    backend = tokenizers.Tokenizer.from_file(str(dirs["tiny-llama"] / "tokenizer.json"))
    tok = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(backend).apply_chat_template([])


def test_template_forms(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = Path(shutil.copytree(dirs["tiny-qwen2"], tmp_path / "ck"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(d).apply_chat_template(CHAT) == "D"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template(CHAT) == "J2"


def test_errors(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = Path(shutil.copytree(dirs["tiny-llama"], tmp_path / "ck"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": {"content": "<eos>"}}))
    with pytest.raises(CheckpointError, match="eos_token '<eos>' is not in the vocabulary"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: no such file"):
        Tokenizer.from_dir(d)
