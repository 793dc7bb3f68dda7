"""The model's tokenizer: tokenizer.json through the `tokenizers` library, plus its chat template."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rempd.model.config import CheckpointError


class Tokenizer:
    """Encode, decode and render chat prompts the way transformers would for the same files."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos_token: bool | None = None,
                 chat_template: str | None = None, source: str = "tokenizer") -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        # None means "whatever tokenizer.json's post-processor does"; True also makes sure of it
        # for tokenizer.json files whose post-processor adds nothing.
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self._template: jinja2.Template | None = None

    def _id_of(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{self.source}: {role} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise CheckpointError(f"{path}: not a valid tokenizer.json: {exc}") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        template_file = model_dir / "chat_template.jinja"  # where transformers 5 saves it
        if template_file.is_file():
            template = template_file.read_text()
        add_bos = config.get("add_bos_token")
        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")),
                   add_bos_token=None if add_bos is None else bool(add_bos),
                   chat_template=template, source=str(model_dir))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. Pass add_special_tokens=False for a rendered chat prompt: chat
        templates write their own BOS, and a second one changes the model's output."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Ids beyond the tokenizer's vocabulary (padded embedding rows) decode to nothing.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages with the checkpoint's chat template.

        A template that rejects the conversation (raise_exception) or fails to render raises
        ValueError with its message, so that the API can answer 400 rather than 500.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.source}: the tokenizer has no chat_template")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc


def _environment() -> ImmutableSandboxedEnvironment:
    # The same settings and helpers transformers gives chat templates, so that HF templates work.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores a special token either as text or as a serialised AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
