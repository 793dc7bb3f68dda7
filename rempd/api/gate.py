"""Admission of generation requests, and the drain that stops it.

Every admitted request holds a Ticket until its answer is fully sent. On SIGTERM the daemon closes
the gate (new requests get 503), waits for the tickets to come back, and at the drain timeout
aborts the rest: each ticket's guard raises TimeoutError inside its request, which then ends with
an error body or an SSE error event instead of being cut off mid-stream.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from rempd.api.errors import unavailable


class Ticket:
    def __init__(self) -> None:
        self.aborted = False
        self.timeouts: set[asyncio.Timeout] = set()

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Awaits inside this block raise TimeoutError once the request is aborted.

        Enter it from the task that does the awaiting: a streaming body runs in a task of its own."""
        async with asyncio.timeout(None) as timeout:
            self.timeouts.add(timeout)
            if self.aborted:
                timeout.reschedule(asyncio.get_running_loop().time())
            try:
                yield
            finally:
                self.timeouts.discard(timeout)

    def abort(self) -> None:
        self.aborted = True
        now = asyncio.get_running_loop().time()
        for timeout in self.timeouts:
            timeout.reschedule(now)


class Gate:
    def __init__(self) -> None:
        self.draining = False
        self.tickets: set[Ticket] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def active(self) -> int:
        return len(self.tickets)

    def admit(self) -> Ticket:
        if self.draining:
            raise unavailable("rempd is shutting down and admits no new requests")
        ticket = Ticket()
        self.tickets.add(ticket)
        self.idle.clear()
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.tickets.discard(ticket)
        if not self.tickets:
            self.idle.set()

    async def drain(self, timeout_s: float) -> int:
        """Close the gate and wait up to timeout_s for admitted requests; returns how many are left."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        except TimeoutError:
            pass
        return self.active

    async def abort_all(self, grace_s: float = 2.0) -> int:
        """Stop every admitted request and give them grace_s to send their error; returns those left."""
        for ticket in list(self.tickets):
            ticket.abort()
        try:
            await asyncio.wait_for(self.idle.wait(), grace_s)
        except TimeoutError:
            pass
        return self.active
