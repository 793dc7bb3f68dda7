"""The driver→worker path for per-step inputs: each StepInput is pickled once into a shared-memory ring, and every
worker is sent only its (offset, length), instead of the pool pickling the whole step once per worker.

The ring is a /dev/shm file mapped by the driver (read-write) and by every worker (read-only), unlinked as soon as
all workers have mapped it, so nothing is left behind whatever dies. Steps are written one after another and wrap
around; a step is read by its workers before the driver collects its reply, and the driver keeps at most pp
steps in flight, so a step larger than 1/MAX_IN_FLIGHT of the ring travels inline instead."""
from __future__ import annotations

import mmap
import os
import pickle
import secrets
from typing import Any

from rempd.shm_store.segments import SHM_DIR

MAX_IN_FLIGHT = 16


class StepChannel:
    def __init__(self, name: str, mapping: mmap.mmap):
        self.name, self.mapping = name, mapping
        self.cursor = 0

    @classmethod
    def create(cls, size: int = 16 << 20) -> "StepChannel":
        name = f"rempsteps-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, mapping)

    @classmethod
    def attach(cls, name: str) -> "StepChannel":
        fd = os.open(SHM_DIR / name, os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(name, mapping)

    def unlink(self) -> None:
        """Once every worker has mapped the ring its name is no longer needed."""
        (SHM_DIR / self.name).unlink(missing_ok=True)

    def write(self, value: Any) -> tuple[int, int] | bytes:
        """Where the pickled value now sits, or the pickle itself when it is too large for the ring."""
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(self.mapping)
        if len(payload) > size // MAX_IN_FLIGHT:
            return payload
        if self.cursor + len(payload) > size:
            self.cursor = 0
        offset = self.cursor
        self.mapping[offset:offset + len(payload)] = payload
        self.cursor += len(payload)
        return offset, len(payload)

    def read(self, ref: tuple[int, int] | bytes) -> Any:
        if isinstance(ref, bytes):
            return pickle.loads(ref)
        offset, length = ref
        return pickle.loads(self.mapping[offset:offset + length])

    def close(self) -> None:
        self.mapping.close()
