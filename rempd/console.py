"""What rempd writes for its operator: log lines (rich on a terminal, plain under journald) and the progress of
the long start-up steps."""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from rempd import systemd

if TYPE_CHECKING:
    from rempd.api.control import Lifecycle

log = logging.getLogger("rempd")


class StartupProgress:
    """Progress of the long start-up steps: a rich bar on a terminal, STATUS= under systemd, else log lines.

    Called from the thread that builds the engine; rich's Progress and sd_notify are both safe there."""

    def __init__(self, life: Lifecycle):
        self.life = life
        self.last: tuple[str, int] = ("", -100)
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "StartupProgress":
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("starting", total=1.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, message: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.life.progress = f"{message} ({fraction:.0%})"
        if self.bar is not None:
            self.bar.update(self.task, description=message, completed=fraction)
        percent = int(fraction * 100)
        if message != self.last[0] or percent >= self.last[1] + 10:  # one line per step or per 10 %
            if self.bar is None:
                log.info("%s", self.life.progress)
            systemd.status(self.life.progress)
            self.last = (message, percent)


def configure_logging(level: int = logging.INFO) -> None:
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))  # rich prints time and level itself
    else:  # journald stamps the time itself
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
