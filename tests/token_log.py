"""The tokens of an engine's requests, gathered from the outputs its steps and switches return."""
from __future__ import annotations

from collections import defaultdict

from rempd.migrate.report import SwitchReport
from rempd.topology import Topology


class TokenLog(defaultdict):
    """request id → the token ids it got so far."""

    def __init__(self) -> None:
        super().__init__(list)

    def add(self, outputs) -> None:
        for out in outputs:
            self[out.request_id] += out.new_token_ids

    def steps(self, engine, count: int) -> None:
        for _ in range(count):
            self.add(engine.step())

    def switch(self, engine, target: Topology) -> SwitchReport:
        """A stop-the-world switch; the outputs of micro-batches that finished while quiescing are kept."""
        report = SwitchReport(id=str(target), source=str(engine.placement), target=str(target))
        self.add(engine.switch(target, report))
        return report

    def finish(self, engine) -> None:
        while engine.has_unfinished():
            self.add(engine.step())
