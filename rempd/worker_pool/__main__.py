"""`python -m rempd.worker_pool ADDRESS`: a worker process, started by WorkerPool. It connects back to the pool,
receives its WorkerSetup, and then runs the methods the driver names until told to shut down."""
import ctypes
import os
import signal
import sys
import traceback
from multiprocessing.connection import Client

import torch

from rempd.worker_pool.worker import Worker, WorkerSetup


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
    try:
        worker = Worker(setup)
        conn.send(("ok", worker.info()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        try:
            result = getattr(worker, method)(*args)
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        if method == "shutdown":
            break


worker_main(sys.argv[1])
