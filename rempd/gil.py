"""How long a Python thread may keep the GIL while another waits for it, set in the daemon and in each worker.

The daemon's engine thread shares the GIL with the event loop that streams every token over HTTP; a worker's step
thread shares it with its staging thread. Python's 5 ms default lets a busy thread keep the GIL that long after
the other is ready to run, on every hand-off: in bench/gil_handoff.py a loop that waits for a 1 ms reply, then
runs 0.1 ms of Python, took 16 ms a round beside a busy thread at 5 ms and 1.8-2.5 ms at 0.5 ms (1.1 ms alone).
Measured on the serving path (4x H100, 7B, a steady 40 requests/s: bench/gpu_session.sh gil_ab), 0.5 ms made it
worse, not better: TP4PP1's TTFT p50 0.167 -> 1.413 s and per-request ITL p50 17.4 -> 26.8 ms; TP2PP2 a little
worse. So rempd keeps Python's interval; REMP_SWITCH_INTERVAL_S stays, to repeat the A/B."""
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
