"""Turns a request's generated token ids into text deltas, cut before the first stop string completed."""
from __future__ import annotations

from collections.abc import Sequence

from rempd.model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens decoded alongside the output. Tokenizers that drop a word's leading space at the
# start of a decode (SentencePiece) need a little left context to keep it; a few tokens suffice.
PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    """Decodes only a short window of recent tokens per step, not the whole output.

    Two kinds of text are held back: the bytes of a UTF-8 character that is not complete yet (the
    decode of the window ends in U+FFFD), and a tail that could be the start of a stop string.
    For a byte-level tokenizer the concatenated deltas plus flush() equal
    tokenizer.decode(generated ids) cut before the stop string that is completed first.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 stop: Sequence[str] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in (stop or ()) if s)  # an empty stop string would match at once
        context = list(prompt_token_ids[-PROMPT_CONTEXT:])
        if self._decode(context).endswith(REPLACEMENT):
            context = []  # a prompt that ends mid-character gives no clean boundary to decode from
        self._ids = context  # context, then every generated id
        self._prefix_offset = 0  # window start: decoded only as left context
        self._read_offset = len(context)  # ids before this have been turned into text
        self._pending = ""  # decoded text held back because it may begin a stop string
        self.token_ids: list[int] = []
        self.text = ""  # all text returned so far
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched

    def add(self, token_ids: Sequence[int]) -> str:
        """Take newly generated ids; return the text they complete (may be empty)."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        self._ids.extend(token_ids)
        return self._release(self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """At the end of a request that did not stop on a string: everything still held back."""
        if self.stopped:
            return ""
        return self._release(self._decode_window(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        # A trailing U+FFFD is usually a character whose remaining bytes are still to come; wait
        # for them. (A real U+FFFD at the end is only delayed: the next token or flush emits it.)
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return self._settled(before, after)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def _settled(self, before: str, after: str) -> str:
        """The text that the newest token left as it was, when the window is held back. Bytes that never form a
        character (a model repeating a lone lead byte) would otherwise hold back the whole stream: if adding the
        newest token only appended to the decode, every U+FFFD before it is final."""
        last = len(self._ids) - 1
        if last <= self._read_offset:
            return ""
        settled = self._decode(self._ids[self._prefix_offset:last])
        if len(settled) <= len(before) or len(after) <= len(settled) or not after.startswith(settled):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, last
        return settled[len(before):]

    def _release(self, text: str, final: bool) -> str:
        held = self._pending + text
        hit = self._first_stop(held)
        if hit is not None:
            index, self.stop_reason = hit
            out, self._pending, self.stopped = held[:index], "", True
        else:
            keep = 0 if final else self._stop_prefix_len(held)
            out, self._pending = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        # Generation stops at the stop string completed first, as a stream of single characters would
        # see it: the earliest-ending match (then the earliest-starting), so the cut does not depend on
        # how tokens were grouped. Held-back text never contains a whole stop string, and nothing
        # already returned can be the start of one, so matches in `text` are all there are.
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            index = text.find(s)
            if index >= 0 and (best is None or (index + len(s), index) < best[:2]):
                best = (index + len(s), index, s)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
