"""Spawns the worker processes once and calls their methods by name over one connection each.

Workers are fresh interpreters (`python -m rempd.worker_pool`), not multiprocessing children, so the
caller's main module is never re-imported and needs no `if __name__ == "__main__"` guard."""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import replace
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from rempd.engine.step_input import StepInput
from rempd.worker_pool.step_channel import StepChannel
from rempd.worker_pool.worker_setup import WorkerSetup

log = logging.getLogger("rempd.workers")


class WorkerError(RuntimeError):
    """A worker raised or died; `index` says which one."""

    def __init__(self, index: int, message: str):
        super().__init__(f"worker {index}: {message}")
        self.index = index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_pid(conn: Connection) -> int:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


class WorkerProcess:
    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.sentinel = os.pidfd_open(popen.pid)  # readable once the process exits: wait() can watch it

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def join(self, timeout: float | None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        os.close(self.sentinel)


class WorkerPool:
    def __init__(self, template: WorkerSetup, devices: list[str], start_timeout: float = 600.0,
                 reply_timeout: float | None = None):
        self.reply_timeout = reply_timeout  # a worker silent this long is taken for hung (e.g. SIGSTOP)
        self.channel = StepChannel.create()
        self.template = replace(template, world_size=len(devices), master_port=free_port(),
                                step_channel=self.channel.name)
        self.devices = devices
        self.procs: list[WorkerProcess] = []
        self.conns: list[Connection] = []
        try:
            authkey = secrets.token_bytes(32)
            with tempfile.TemporaryDirectory(prefix="remp-pool-") as tmp:
                address = str(Path(tmp) / "pool.sock")
                with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
                    # all start at once: each spends seconds importing torch before it connects
                    for _ in devices:
                        popen = subprocess.Popen([sys.executable, "-m", "rempd.worker_pool", address],
                                                 stdin=subprocess.PIPE, start_new_session=False)
                        popen.stdin.write(authkey)
                        popen.stdin.close()
                        self.procs.append(WorkerProcess(popen))
                    index_of = {p.pid: i for i, p in enumerate(self.procs)}
                    conns: dict[int, Connection] = {}
                    for _ in devices:  # they connect in any order; the peer's pid says which one it is
                        conn = listener.accept()
                        index = index_of[peer_pid(conn)]
                        conn.send(replace(self.template, index=index, device=devices[index]))
                        conns[index] = conn
                    self.conns = [conns[i] for i in range(len(devices))]
            try:
                self.infos = self.collect(list(range(len(devices))), start_timeout)
            except BaseException:
                self.close(timeout=1.0)  # the others wait for the failed one in the world group's rendezvous
                raise
        finally:
            self.channel.unlink()  # every worker has mapped it by now, or failed

    @property
    def size(self) -> int:
        return len(self.devices)

    def pids(self) -> list[int | None]:
        return [p.pid for p in self.procs]

    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self.procs]

    def send(self, method: str, *args: Any, workers: list[int] | None = None) -> list[int]:
        targets = list(range(self.size)) if workers is None else workers
        for i in targets:
            try:
                self.conns[i].send((method, args))
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise WorkerError(i, f"not reachable ({exc})") from exc
        return targets

    def send_step(self, step: StepInput, workers: list[int]) -> list[int]:
        """Start `execute` of one step on `workers`: the step is written once to shared memory, not per worker."""
        return self.send("execute_shared", self.channel.write(step), workers=workers)

    def _read(self, index: int) -> Any:
        try:
            status, value = self.conns[index].recv()
        except (EOFError, ConnectionResetError) as exc:
            raise WorkerError(index, "died while replying") from exc
        if status == "error":
            # the exception's own line says what went wrong; the full traceback goes to the log
            log.error("worker %d failed:\n%s", index, value)
            raise WorkerError(index, value.strip().splitlines()[-1])
        return value

    def collect(self, workers: list[int], timeout: float | None = None) -> list[Any]:
        """One reply from each worker. Replies are read as they come, so a failure is raised at once, even while
        other workers are blocked waiting for the failed one; a death of any worker ends the wait too."""
        timeout = self.reply_timeout if timeout is None else timeout
        replies: dict[int, Any] = {}
        pending = {self.conns[i]: i for i in workers}
        while pending:
            ready = wait([*pending, *(p.sentinel for p in self.procs)], timeout)
            if not ready:
                silent = self._stopped(list(pending.values())) or list(pending.values())
                raise WorkerError(silent[0], f"no reply within {timeout} s")
            for conn in [c for c in ready if c in pending]:
                index = pending.pop(conn)
                replies[index] = self._read(index)
            dead = [i for i, p in enumerate(self.procs) if p.sentinel in ready]
            if dead and pending:
                raise WorkerError(dead[0], f"died (exit code {self.procs[dead[0]].exitcode})")
        return [replies[i] for i in workers]

    def _stopped(self, workers: list[int]) -> list[int]:
        """Those of `workers` that are stopped (SIGSTOP, a debugger): the likely cause of a silence."""
        found = []
        for i in workers:
            try:
                state = Path(f"/proc/{self.procs[i].pid}/stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state in ("T", "t"):
                found.append(i)
        return found

    def call(self, method: str, *args: Any, workers: list[int] | None = None,
             timeout: float | None = None) -> list[Any]:
        return self.collect(self.send(method, *args, workers=workers), timeout)

    def close(self, timeout: float = 10.0) -> None:
        for i, conn in enumerate(self.conns):
            if self.procs[i].is_alive():
                try:
                    conn.send(("shutdown", ()))
                except OSError:
                    pass
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn, proc in zip(self.conns, self.procs):
            conn.close()
            proc.close()
        self.channel.close()
