"""Incremental detokenizer: equals a full decode, never splits a character, cuts at stop strings."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from rempd.engine.detokenizer import IncrementalDetokenizer
from rempd.model.make_checkpoint import make_checkpoint
from rempd.model.tokenizer import Tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(make_checkpoint("tiny-llama", tmp_path_factory.mktemp("detok") / "ck"))


def _byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so that every multi-byte character is split across tokens."""
    table = _byte_to_char()
    return [tok.backend.token_to_id(table[b]) for b in text.encode()]


def _byte_to_char() -> dict[int, str]:
    # GPT-2's byte-level table: printable bytes map to themselves, the rest to chars from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


def _run(tok: Tokenizer, ids: list[int], cuts: list[int], stop: list[str] | None = None,
         prompt: list[int] | None = None) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt or [], stop)
    deltas, start = [], 0
    for cut in sorted({c % (len(ids) + 1) for c in cuts} | {len(ids)}):
        deltas.append(detok.add(ids[start:cut]))
        start = cut
    deltas.append(detok.flush())
    return detok, deltas


def _chunks() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 10_000), max_size=12)


@SETTINGS
@given(ids=st.lists(st.integers(0, 511), max_size=40), cuts=_chunks(),
       prompt=st.lists(st.integers(0, 511), max_size=8))
def test_random_ids_equal_full_decode(tok: Tokenizer, ids: list[int], cuts: list[int], prompt: list[int]) -> None:
    detok, deltas = _run(tok, ids, cuts, prompt=prompt)
    assert "".join(deltas) == detok.text == tok.decode(ids)
    assert not detok.stopped and detok.token_ids == ids


@SETTINGS
@given(text=st.text(alphabet="aé世😀 \n", max_size=20), cuts=_chunks())
def test_multibyte_never_split(tok: Tokenizer, text: str, cuts: list[int]) -> None:
    ids = _byte_ids(tok, text)
    _, deltas = _run(tok, ids, cuts)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_one_token_at_a_time_holds_partial_character(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "a😀b")
    detok = IncrementalDetokenizer(tok, [], [])
    assert [detok.add([i]) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert detok.flush() == ""


def test_invalid_bytes_come_out_as_in_a_full_decode(tok: Tokenizer) -> None:
    ids = _byte_ids(tok, "x")[:0] + [tok.backend.token_to_id(_byte_to_char()[b]) for b in (0xF0, 0x9F, 0x41, 0x80)]
    _, deltas = _run(tok, ids, [1, 2, 3])
    assert "".join(deltas) == tok.decode(ids) == "\ufffdA\ufffd"


@SETTINGS
@given(text=st.text(alphabet="abé😀", max_size=24), cuts=_chunks(), data=st.data())
def test_stop_strings(tok: Tokenizer, text: str, cuts: list[int], data: st.DataObject) -> None:
    # Stop strings drawn from the text itself (so they match, often across token boundaries and
    # inside multi-byte characters' tokens) and from the same small alphabet (so they overlap).
    stops = data.draw(st.lists(st.one_of(
        st.text(alphabet="abé😀", min_size=1, max_size=4),
        st.integers(0, len(text)).flatmap(lambda i: st.just(text[i:i + 3]))), max_size=3))
    ids = data.draw(st.sampled_from([_byte_ids(tok, text), tok.encode(text, add_special_tokens=False)]))
    detok, deltas = _run(tok, ids, cuts, stop=stops)
    # cut before the stop string completed first, however the tokens were grouped into chunks
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    expected = text[:min(hits)[1]] if hits else text
    assert "".join(deltas) == detok.text == expected
    assert detok.stopped == bool(hits)
    if hits:
        reason = detok.stop_reason
        assert reason in stops and (text.find(reason) + len(reason), text.find(reason)) == min(hits)


def test_stop_prefix_is_held_then_released(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], ["abc", "xyz"])
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert detok.add(enc("1a")) == "1"
    assert detok.add(enc("b")) == ""
    assert detok.add(enc("d")) == "abd"
    assert detok.add(enc("x")) == ""
    assert detok.flush() == "x"
    assert detok.text == "1abdx" and not detok.stopped


def test_stop_ends_output(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"), ["STOP"])
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert detok.add(enc("hello ST")) == "hello "
    assert detok.add(enc("OP and more")) == ""
    assert detok.stopped and detok.stop_reason == "STOP" and detok.text == "hello "
    assert detok.add(enc("ignored")) == "" and detok.flush() == ""


def test_special_tokens(tok: Tokenizer) -> None:
    ids = [*tok.encode("a", add_special_tokens=False), 4, *tok.encode("b", add_special_tokens=False)]
    _, deltas = _run(tok, ids, [1, 2])
    assert "".join(deltas) == "ab"
    detok = IncrementalDetokenizer(tok, [], ["<|im_end|>"], skip_special_tokens=False)
    assert detok.add(ids) == "a" and detok.stopped


def test_empty_stop_string_is_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], [""])
    assert detok.add(tok.encode("hi", add_special_tokens=False)) == "hi" and not detok.stopped


def test_sentencepiece_style_leading_space_kept(tmp_path: Path) -> None:
    # A Metaspace tokenizer drops the first word's space when decoding from the start; the prompt
    # context keeps the space that separates the output from the prompt.
    from tokenizers import Tokenizer as Backend, decoders, models
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    sp = Tokenizer(backend)
    detok = IncrementalDetokenizer(sp, [1], [])
    assert detok.add([2]) + detok.flush() == " world"


def test_the_stop_string_completed_first_wins_however_tokens_are_grouped(tok: Tokenizer) -> None:
    # found by hypothesis: "aéa" starts before "é" but completes after it; streaming one token at a time
    # stops at "é", so a single chunk of all the tokens must too
    ids = _byte_ids(tok, "aéaaé😀")
    for cuts in ([], list(range(len(ids))), [3], [1, 4]):
        detok, deltas = _run(tok, ids, cuts, stop=["é", "aéa"])
        assert "".join(deltas) == detok.text == "a" and detok.stop_reason == "é", cuts


def test_bytes_that_never_form_a_character_do_not_hold_back_the_stream(tok: Tokenizer) -> None:
    """A random-weight model can repeat a lone UTF-8 lead byte for its whole output: each one is a final U+FFFD
    once the next token arrives, so text flows token by token instead of all at the end."""
    lead = tok.backend.token_to_id(_byte_to_char()[0xE2])
    ids = [lead] * 20 + _byte_ids(tok, "ok €")
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert sum(1 for d in deltas[:20] if d) >= 18
    euro = _byte_ids(tok, "€")
    assert deltas[-len(euro) - 1:-2] == [""] * (len(euro) - 1)  # the euro sign's first bytes wait for the last
