"""One scheduled step as the workers receive it: plain lists, cheap to send."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SampleSpec:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    index: int  # how many tokens the sequence has generated so far: sampling is stateless per (seed, index)


@dataclass
class StepInput:
    token_ids: list[int]  # new tokens of every scheduled sequence, concatenated
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_indices: list[int]  # rows of the step whose logits are sampled (the last token of a finished prefill or a decode)
    samples: list[SampleSpec | None]  # one per sampled row; None: greedy
    # async tokens: the first stage keeps this step's sampled tokens on the device (at pp > 1 the last stage
    # sends them there), and a token id -g-1 stands for the token of sampled row number g, sampled by a step
    # still in flight when this one was sent (its value is not on the host yet)
    feedback: bool = False
    first_sample: int = 0  # the number of this step's first sampled row: rows are numbered across steps

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
