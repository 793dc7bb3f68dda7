"""A switch's phases, timed into its report: the phase running is shown while it runs, a phase that raises is
left as the report's phase (the rollback reads where it failed), and a fault injected for a phase fires as it
begins. A phase entered again (staging's work, spread over many gaps) adds up."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rempd.migrate.report import SwitchReport

Fault = tuple[str, str]  # (phase, "raise" | "kill" | "delay"): for tests and the fault bench


def inject_fault(engine, phase: str, kind: str) -> None:
    if kind == "kill":
        os.kill(engine.pool.pids()[engine.placement.workers[-1]], signal.SIGKILL)
    elif kind == "delay":
        time.sleep(1.0)
    else:
        raise RuntimeError(f"injected fault in {phase}")


class PhaseClock:
    def __init__(self, engine, report: SwitchReport, fault: Fault | None = None,
                 on_phase: Callable[[SwitchReport], None] | None = None):
        self.engine, self.report, self.fault = engine, report, fault
        self.on_phase = on_phase or (lambda report: None)

    @contextmanager
    def phase(self, name: str) -> Iterator[float]:
        """Yields the phase's start (time.perf_counter)."""
        self.report.phase = name
        self.on_phase(self.report)
        if self.fault and self.fault[0] == name:
            kind, self.fault = self.fault[1], None
            inject_fault(self.engine, name, kind)
        start = time.perf_counter()
        yield start
        self.report.phases[name] = self.report.phases.get(name, 0.0) + time.perf_counter() - start
