"""The work of a staged switch before its cut, in order, and what one gap between two serving steps takes of it:
a task that keeps the workers' hosts busy (the groups' first use, the build, one graph capture) alone, weight
chunks a few at a time as one transfer. The switch posts what it says (staging.py)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rempd.migrate.plan import WeightPiece


@dataclass(frozen=True)
class GapWork:
    kind: str  # what it is counted as in the report (staging_<kind>): groups | weights | poll | build | graphs
    op: str  # the workers' staging step (stage_step.py)
    args: tuple = ()


class StagingTasks:
    def __init__(self, weight_chunks: list[list[WeightPiece]], graphs: bool):
        self.queue: deque[tuple] = deque([("groups",), *(("weights", c) for c in weight_chunks), ("build",),
                                          *([("graphs",)] if graphs else [])])

    def __bool__(self) -> bool:
        return bool(self.queue)

    @property
    def next_kind(self) -> str:
        return self.queue[0][0]

    def next_gap(self, loaded: bool, chunks_per_gap: int, graph_sizes: list[int]) -> GapWork | None:
        """The next gap's work. `loaded`: the workers' host-store loads are in (else the build would wait for
        them: a poll asks again). `graph_sizes`: the decode batch sizes to capture graphs for, one a gap (none:
        no graphs, as the cut will not keep the pool they would be captured over). None: nothing this gap."""
        kind = self.next_kind
        if kind == "build" and not loaded:
            return GapWork("poll", "poll")
        task = self.queue.popleft()
        if kind == "weights":
            pieces = list(task[1])
            for _ in range(chunks_per_gap - 1):
                if not (self.queue and self.queue[0][0] == "weights"):
                    break
                pieces += self.queue.popleft()[1]
            return GapWork("weights", "chunk", (pieces, []))
        if kind == "graphs":
            sizes = task[1] if len(task) > 1 else graph_sizes
            if not sizes:
                return None
            if len(sizes) > 1:
                self.queue.appendleft(("graphs", sizes[1:]))
            return GapWork("graphs", "graphs", (sizes[:1],))
        return GapWork(kind, kind)
