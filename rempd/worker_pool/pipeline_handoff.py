"""A worker's hand-offs between pipeline stages while serving: hidden states from the stage before and to the
stage after (the send runs while the next step computes), and, with async tokens, the sampled tokens from the
last stage back to the first (TokenFeedback). All over the world group, rank to rank within a TP rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from rempd.engine.step_input import StepInput
from rempd.topology import Placement
from rempd.worker_pool.token_feedback import TokenFeedback


class PipelineHandoff:
    def __init__(self, world: dist.ProcessGroup, device: torch.device, world_size: int):
        self.world, self.device = world, device
        self.sends: list[dist.Work] = []  # hidden states on their way to the next stage
        self.feedback = TokenFeedback(world, device, keep=world_size + 1)

    def receive(self, step: StepInput, placement: Placement, me: int, hidden_size: int,
                dtype: torch.dtype) -> torch.Tensor:
        pp_rank, tp_rank = placement.coords(me)
        hidden = torch.empty(step.num_tokens, hidden_size, dtype=dtype, device=self.device)
        dist.recv(hidden, src=placement.worker(pp_rank - 1, tp_rank), group=self.world)
        return hidden

    def send(self, step: StepInput, out: torch.Tensor, placement: Placement, me: int) -> None:
        """Hand `out` (not to be overwritten until sent) to the next stage; the first stage then expects the
        step's sampled tokens: after the hidden send, in the order the last stage posts them."""
        pp_rank, tp_rank = placement.coords(me)
        self.wait_sends()
        self.sends.append(dist.isend(out, dst=placement.worker(pp_rank + 1, tp_rank), group=self.world))
        if pp_rank == 0:
            self.feedback.expect(step, placement.worker(placement.topology.pp - 1, tp_rank))

    def sampled(self, step: StepInput, tokens: torch.Tensor, placement: Placement, me: int) -> None:
        """The last stage sampled `tokens` with feedback: the first stage's worker of its TP rank keeps them."""
        pp_rank, tp_rank = placement.coords(me)
        self.feedback.sampled(step, tokens, None if pp_rank == 0 else placement.worker(0, tp_rank))

    def wait_sends(self) -> None:
        for work in self.sends:
            work.wait()
        self.sends.clear()

    def settle(self) -> None:
        """Complete every transfer posted, before a switch or anything else moves data between workers."""
        self.wait_sends()
        self.feedback.settle()

    def clear(self) -> None:
        """settle(), and forget the kept tokens: the stage is going away."""
        self.wait_sends()
        self.feedback.clear()
