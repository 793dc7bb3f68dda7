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
from collections import deque
from dataclasses import replace
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from rempd.engine.step_input import StepInput
from rempd.worker_pool.step_channel import StepChannel
from rempd.worker_pool.ticket import Ticket
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
        # per worker, whose replies are due, in the order of the calls (None: a call's, read by collect), and
        # the calls' replies read early, while a posted call's reply was looked for
        self.due: list[deque[Ticket | None]] = [deque() for _ in devices]
        self.early: list[deque[tuple[str, Any]]] = [deque() for _ in devices]
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

    def send(self, method: str, *args: Any, workers: list[int] | None = None, ticket: Ticket | None = None
             ) -> list[int]:
        targets = list(range(self.size)) if workers is None else workers
        for i in targets:
            try:
                self.conns[i].send((method, args))
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise WorkerError(i, f"not reachable ({exc})") from exc
            self.due[i].append(ticket)
        return targets

    def post(self, method: str, *args: Any, workers: list[int] | None = None) -> Ticket:
        """Call without waiting: steps sent before it still have their replies read by collect, in order, and
        its own replies are picked up on the way (poll, or any later collect), so the engine keeps stepping."""
        ticket = Ticket(method, list(range(self.size)) if workers is None else workers)
        self.send(method, *args, workers=ticket.workers, ticket=ticket)
        return ticket

    def poll(self, ticket: Ticket) -> bool:
        """Read, without blocking, what the ticket's workers have replied so far; whether all of it is in."""
        for i in ticket.workers:
            while i not in ticket.replies and self.due[i] and self.conns[i].poll(0):
                self._route(i, stash=True)
            if i not in ticket.replies and not self.procs[i].is_alive():
                raise WorkerError(i, f"died (exit code {self.procs[i].exitcode})")
        return ticket.done

    def result(self, ticket: Ticket, timeout: float | None = None) -> list[Any]:
        """The ticket's replies, waiting for them; a worker's error is raised as it would be by call."""
        for i in ticket.workers:
            while i not in ticket.replies:
                limit = self.reply_timeout if timeout is None else timeout
                if not wait([self.conns[i], self.procs[i].sentinel], limit):
                    raise WorkerError(i, f"no reply to {ticket.method} within {limit} s")
                if not self.conns[i].poll(0):
                    raise WorkerError(i, f"died (exit code {self.procs[i].exitcode})")
                self._route(i, stash=True)
        return [self._value(i, *ticket.replies[i]) for i in ticket.workers]

    def _route(self, index: int, stash: bool = False) -> tuple[str, Any] | None:
        """Read one reply of a worker: a posted call's goes to its ticket (None returned), a call's is returned,
        or with `stash` kept for the collect that wants it."""
        try:
            reply = self.conns[index].recv()
        except (EOFError, ConnectionResetError) as exc:
            raise WorkerError(index, "died while replying") from exc
        ticket = self.due[index].popleft() if self.due[index] else None
        if ticket is None:
            if not stash:
                return reply
            self.early[index].append(reply)
            return None
        ticket.replies[index] = reply
        return None

    def send_step(self, step: StepInput, workers: list[int]) -> list[int]:
        """Start `execute` of one step on `workers`: the step is written once to shared memory, not per worker."""
        return self.send("execute_shared", self.channel.write(step), workers=workers)

    def _value(self, index: int, status: str, value: Any) -> Any:
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
        for i in workers:
            if self.early[i]:
                replies[i] = self._value(i, *self.early[i].popleft())
        pending = {self.conns[i]: i for i in workers if i not in replies}
        while pending:
            ready = wait([*pending, *(p.sentinel for p in self.procs)], timeout)
            if not ready:
                silent = self._stopped(list(pending.values())) or list(pending.values())
                raise WorkerError(silent[0], f"no reply within {timeout} s")
            for conn in [c for c in ready if c in pending]:
                reply = self._route(pending[conn])
                if reply is not None:  # else a posted call's reply came first: this call's is still to come
                    index = pending.pop(conn)
                    replies[index] = self._value(index, *reply)
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
