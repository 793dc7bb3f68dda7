"""A request as the scheduler sees it: its tokens, how many are in the KV cache, and where."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rempd.engine.sampling_params import SamplingParams
from rempd.engine.step_input import SampleSpec


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # every request has one, so sampling never depends on which worker or topology runs it
    arrival: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    in_flight: int = 0  # steps the workers have not finished that it is part of
    num_pending: int = 0  # tokens those steps sample that are not in token_ids yet (async tokens)
    sample_number: int = -1  # the number of its row among all sampled rows sent, in the last step sampling it
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sample_spec(self, ahead: int = 0) -> SampleSpec | None:
        """None for greedy decoding: the argmax needs no parameters, and None costs nothing to send. `ahead`:
        tokens sampled before this one that are not in token_ids yet."""
        p = self.params
        if p.temperature == 0.0:
            return None
        return SampleSpec(p.temperature, p.top_k, p.top_p, self.seed, self.num_output_tokens + ahead)
