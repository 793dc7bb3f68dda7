"""`python -m rempd.worker_pool ADDRESS`: a worker process, started by WorkerPool. It connects back to the pool,
receives its WorkerSetup, and then runs the methods the driver names until told to shut down."""
import ctypes
import os
import signal
import sys
import traceback
from multiprocessing.connection import Client

import torch

from rempd.gil import set_switch_interval
from rempd.worker_pool.device_memory import configure_allocator
from rempd.worker_pool.pending_tokens import PendingTokens
from rempd.worker_pool.worker import Worker
from rempd.worker_pool.worker_setup import WorkerSetup

PENDING_POLL_S = 0.0002  # how often a worker with a pending reply checks whether its tokens are in
RUN_BEHIND_PENDING = ("execute_shared", "staged")


def _die_with_parent() -> None:
    """A worker must never outlive the daemon, even one killed with SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(address: str) -> None:
    _die_with_parent()
    authkey = sys.stdin.buffer.read()
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    setup: WorkerSetup = conn.recv()
    # Ctrl-C, and systemd's SIGTERM to the whole cgroup, are for the daemon: it drains, then ends us in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // max(1, setup.world_size))))
    set_switch_interval()
    configure_allocator()
    try:
        worker = Worker(setup)
        conn.send(("ok", worker.info()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    pending: PendingTokens | None = None  # a step's reply whose tokens the device is still computing
    while True:
        # async tokens: the next step usually arrives before the pending tokens are in; it is launched first,
        # right behind them on the device, and then they are sent
        while pending is not None and not conn.poll(PENDING_POLL_S):
            if pending.ready():
                pending = _reply(conn, pending)
        try:
            method, args = conn.recv()
        except EOFError:
            break
        # replies go in the order of the calls; a step and a staged switch's step (posted between two steps) run
        # first, while the pending tokens are computed, and are answered after them
        if pending is not None and method not in RUN_BEHIND_PENDING:
            pending = _reply(conn, pending)
        try:
            result = getattr(worker, method)(*args)
        except Exception:
            pending = _reply(conn, pending)
            conn.send(("error", traceback.format_exc()))
        else:
            pending = _reply(conn, pending)
            if isinstance(result, PendingTokens):
                pending = result
            else:
                conn.send(("ok", result))
        if method == "shutdown":
            break


def _reply(conn, pending: PendingTokens | None) -> None:
    """Send a pending reply, once its tokens are on the host; returns the new (no) pending reply."""
    if pending is not None:
        conn.send(("ok", pending.value()))
    return None


worker_main(sys.argv[1])
