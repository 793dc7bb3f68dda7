"""Sampled tokens on their way to the host (async tokens): a worker replies to a step with them only once they
are in, and meanwhile receives and launches the next step, which reads them on the device (StepRunner)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingTokens:
    host: torch.Tensor  # pinned on CUDA, filled by a copy queued behind the step's sampling
    event: torch.cuda.Event | None  # recorded after that copy, so waiting on it does not wait for later steps

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def value(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def tokens_to_host(tokens: torch.Tensor) -> PendingTokens:
    """Start the tokens' copy to the host without waiting for the device (on a CPU device they are there: the
    worker's reply is deferred all the same, so that CPU runs take the path of GPU ones)."""
    if tokens.device.type != "cuda":
        return PendingTokens(tokens, None)
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingTokens(host, event)


def feed_back(ids: torch.Tensor, last: torch.Tensor) -> None:
    """In place: each id -k-1 becomes last[k], the k-th token the previous step sampled, on the device (no wait)."""
    picked = last.index_select(0, (-ids - 1).clamp(0, last.numel() - 1))
    ids.copy_(torch.where(ids < 0, picked, ids))
