"""A posted call to some workers: sent now, its replies read whenever they come, in their place among the
replies of the steps sent before and after it (WorkerPool.post)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Ticket:
    method: str
    workers: list[int]
    replies: dict[int, tuple[str, Any]] = field(default_factory=dict)  # worker → (status, value)

    @property
    def done(self) -> bool:
        return len(self.replies) == len(self.workers)
