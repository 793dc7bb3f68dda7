"""The GIL hand-off behind rempd/gil.py: a thread that waits for a reply from another thread (1 ms, the GIL
released meanwhile, as a worker's step), then runs ~0.1 ms of Python (the engine's own work), timed per round
alone and beside a thread that runs Python without pause (the event loop streaming tokens), at Python's default
switch interval and at the one the serving A/B tries (rempd/gil.py). CPU only; prints one line per case.

    python bench/gil_handoff.py [--rounds 300]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time

from rempd.gil import CANDIDATE_INTERVAL_S


def rounds(interval: float, busy: bool, count: int) -> list[float]:
    sys.setswitchinterval(interval)
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def reply() -> None:
        while data := theirs.recv(8):
            time.sleep(0.001)
            theirs.send(data)

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    threads = [threading.Thread(target=reply, daemon=True)]
    threads += [threading.Thread(target=spin, daemon=True)] if busy else []
    for t in threads:
        t.start()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        ours.send(b"x")
        ours.recv(8)
        sum(range(3000))
        times.append(time.perf_counter() - start)
    stop.set()
    ours.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    for interval in (0.005, CANDIDATE_INTERVAL_S):
        for busy in (False, True):
            t = sorted(rounds(interval, busy, args.rounds))
            print(f"switch interval {interval * 1e3:.1f} ms, {'beside a busy thread' if busy else 'alone':>20}: "
                  f"round median {statistics.median(t) * 1e3:.2f} ms, p90 {t[int(0.9 * len(t))] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
