"""A byte-level BPE tokenizer built offline for synthetic checkpoints: exactly the model's vocabulary size, so
every id a random model samples decodes, and a ChatML-like chat template."""
from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_END_ID = 1, 2, 4
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# What the BPE merges are learned from, so that common English encodes in fewer tokens than bytes.
CORPUS = """\
The operator runs the server on a node with several GPUs. Clients send requests to the server and
the server sends back the tokens of the answer as they are generated. When the load changes, the
model can move to another topology while it keeps serving: the weights are resharded, the cache of
every live request is carried over, and no request is lost. The quick brown fox jumps over the
lazy dog. She said that the weather would be fine, and then it rained for three days in a row.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 2024 and 3.14159 appear in text as well.
def main(): return [x * 2 for x in range(10) if x % 3 == 0]  # code, too
"""


def build_tokenizer(vocab_size: int, add_bos: bool) -> BackendTokenizer:
    """A byte-level BPE of exactly vocab_size ids: specials, 256 bytes, merges learned from
    CORPUS, then filler merges, so that every id the model can sample decodes to something."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *byte_chars])}
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} base tokens")
    merges = _learn_merges(vocab, vocab_size)
    merges += _filler_merges(vocab, vocab_size)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    return backend


def _learn_merges(vocab: dict[str, int], vocab_size: int) -> list[tuple[str, str]]:
    # Plain BPE, ties broken by the pair itself so that the result never depends on hash order.
    words: dict[tuple[str, ...], int] = {}
    for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(CORPUS):
        words[tuple(piece)] = words.get(tuple(piece), 0) + 1
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        best = min(pairs, key=lambda p: (-pairs[p], p), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = {_merge(word, best): count for word, count in words.items()}
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _filler_merges(vocab: dict[str, int], vocab_size: int) -> list[tuple[str, str]]:
    # Extend tokens by one base token at a time; every new token can be extended again, so this
    # reaches any vocab_size.
    base = [t for t in vocab if t not in SPECIAL_TOKENS]
    grown = list(base)
    merges: list[tuple[str, str]] = []
    for left in grown:  # grows while we iterate
        for right in base:
            if len(vocab) >= vocab_size:
                return merges
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                grown.append(left + right)
                merges.append((left, right))
    return merges
