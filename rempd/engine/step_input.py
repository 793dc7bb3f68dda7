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
    # async tokens: the workers keep this step's sampled tokens on the device, and a token id -k-1 stands for
    # the k-th token the previous step sampled (its value is not on the host yet when this step is sent)
    feedback: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
