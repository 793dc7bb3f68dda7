"""Async tokens on a first stage: the tokens recent steps sampled, kept on the device for the steps sent before
those tokens reached the host (StepInput.feedback). At pp = 1 the first stage samples them itself; at pp > 1 the
last stage's worker of the same TP rank sends them over the world group, once per step that samples with
feedback, and the first stage posts the matching receive in the same step: both sides know the transfer from
the StepInput alone, and post it in the order they run steps, so every send meets its receive."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from rempd.engine.step_input import StepInput


@dataclass
class SampledRows:
    first: int  # the number of its first sampled row (StepInput.first_sample)
    tokens: torch.Tensor
    arrival: dist.Work | None  # its receive from the last stage, until waited for

    @property
    def end(self) -> int:
        return self.first + self.tokens.numel()

    def arrived(self) -> torch.Tensor:
        """The tokens, once received: on CUDA the current stream waits for the receive, the host does not."""
        if self.arrival is not None:
            self.arrival.wait()
            self.arrival = None
        return self.tokens


class TokenFeedback:
    def __init__(self, world: dist.ProcessGroup, device: torch.device, keep: int):
        """keep: how many sampling steps' tokens to hold. A step reads only tokens of steps in flight when it was
        sent, at most pp before it, so the world size (pp's bound) plus one always suffices."""
        self.world, self.device, self.keep = world, device, keep
        self.window: deque[SampledRows] = deque()
        self.sends: list[dist.Work] = []  # last stage: token sends not known to be done

    def expect(self, step: StepInput, src: int) -> None:
        """First stage at pp > 1: receive this step's sampled tokens from `src`, a worker of the last stage,
        without waiting (a later step that reads them waits)."""
        if step.feedback and step.samples:
            tokens = torch.empty(len(step.samples), dtype=torch.long, device=self.device)
            self._keep(SampledRows(step.first_sample, tokens, dist.irecv(tokens, src=src, group=self.world)))

    def sampled(self, step: StepInput, tokens: torch.Tensor, dst: int | None) -> None:
        """A step's sampled tokens on the last stage: kept here (dst None: this is the first stage too), or sent
        to `dst`, the first stage's worker that expects them."""
        if dst is None:
            self._keep(SampledRows(step.first_sample, tokens, None))
            return
        self.sends = [work for work in self.sends if not work.is_completed()]
        self.sends.append(dist.isend(tokens, dst=dst, group=self.world))

    def resolve(self, step: StepInput) -> tuple[StepInput, torch.Tensor | None]:
        """The step with each token id -g-1 (sampled row number g) renumbered into the returned tensor, the tokens
        of the steps it reads, concatenated; (step, None) when it reads none. Waits only for those steps."""
        if min(step.token_ids) >= 0:
            return step, None
        offsets: dict[int, int] = {}  # first row number of a kept step → where its tokens start in `parts`
        parts: list[torch.Tensor] = []
        ids = []
        for token in step.token_ids:
            if token >= 0:
                ids.append(token)
                continue
            number = -token - 1
            rows = next((r for r in self.window if r.first <= number < r.end), None)
            if rows is None:
                raise RuntimeError(f"a step reads sampled row {number}, which no step kept here")
            if rows.first not in offsets:
                offsets[rows.first] = sum(p.numel() for p in parts)
                parts.append(rows.arrived())
            ids.append(-(offsets[rows.first] + number - rows.first) - 1)
        return replace(step, token_ids=ids), parts[0] if len(parts) == 1 else torch.cat(parts)

    def _keep(self, rows: SampledRows) -> None:
        self.window.append(rows)
        while len(self.window) > self.keep:
            self.window.popleft().arrived()  # a receive is completed, never dropped while posted

    def settle(self) -> None:
        """Complete every transfer posted (before a switch or anything else moves data between workers)."""
        for rows in self.window:
            rows.arrived()
        for work in self.sends:
            work.wait()
        self.sends.clear()

    def clear(self) -> None:
        self.settle()
        self.window.clear()
