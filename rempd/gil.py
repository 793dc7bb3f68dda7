"""How long a Python thread may keep the GIL while another waits for it, set in the daemon and in each worker.

The daemon's engine thread shares the GIL with the event loop that streams every token over HTTP; a worker's step
thread shares it with its staging thread. Python's 5 ms default lets a busy thread keep the GIL that long after
the other is ready to run, on every hand-off: in bench/gil_handoff.py a loop that waits for a 1 ms reply, then
runs 0.1 ms of Python, took 16 ms a round beside a busy thread at 5 ms and 1.8-2.5 ms at 0.5 ms (1.1 ms alone).
Not measured on the serving path yet, and a shorter interval makes every cross-thread read of engine state that is
not one C call likelier to meet a write midway (it showed GET /v1/switches/ID failing on a report being written):
so rempd keeps Python's interval unless REMP_SWITCH_INTERVAL_S names one, for the A/B on 4x H100."""
from __future__ import annotations

import os
import sys

CANDIDATE_INTERVAL_S = 0.0005  # what the A/B tries against Python's 5 ms
SWITCH_INTERVAL_ENV = "REMP_SWITCH_INTERVAL_S"


def set_switch_interval() -> float:
    """The interval this process runs at: REMP_SWITCH_INTERVAL_S's, or Python's."""
    if os.environ.get(SWITCH_INTERVAL_ENV):
        sys.setswitchinterval(float(os.environ[SWITCH_INTERVAL_ENV]))
    return sys.getswitchinterval()
