"""A weight store: one named /dev/shm segment holding a whole checkpoint, attached zero-copy.

We open /dev/shm files with os.open + mmap instead of multiprocessing.shared_memory: before
Python 3.13 every SharedMemory() — attaching ones too — registers the segment with the
multiprocessing resource tracker, which unlinks it when that process tree exits, so a worker
dying would delete the daemon's weights. Nothing here ever talks to the resource tracker.
"""
from __future__ import annotations

import mmap
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from rempd.shm_store.manifest import (HEADER, Manifest, ManifestEntry, SegmentHeader,
                                      SegmentState, StoreError, StoreNotFoundError)
from rempd.shm_store.segments import shm_path, unlink_if_owner

if TYPE_CHECKING:
    from rempd.shm_store.loader import LoadStats, StoreBuilder


class WeightStore:
    """A mapped weight-store segment. Build with create()/build(), open with attach().

    Tensors returned by tensor() and rows() are zero-copy views of shared memory that every
    worker reads: treat them as read-only and copy (e.g. `.to(device)`, `.clone()`) before any
    in-place change. Attached stores map the segment PROT_READ, so a stray write crashes the
    writer with SIGSEGV instead of silently corrupting every worker's weights. The views stay
    valid after close(): the mapping is released when the last view is garbage-collected.
    """

    def __init__(self, name: str, mapping: mmap.mmap, *, owner: bool,
                 load_stats: "LoadStats | None" = None) -> None:
        path = shm_path(name)
        header = SegmentHeader.unpack(mapping[:HEADER.size], str(path))
        if header.state is not SegmentState.READY:
            raise StoreError(f"{path}: still being loaded by pid {header.owner_pid}")
        if len(mapping) < header.segment_bytes:
            raise StoreError(f"{path}: truncated ({len(mapping)} bytes, header says "
                             f"{header.segment_bytes})")
        text = mapping[HEADER.size:HEADER.size + header.manifest_len].decode("utf-8", "replace")
        self.manifest = Manifest.from_json(text, str(path))
        self.name = path.name
        self.path = path
        self.owner = owner
        self.header = header
        self.load_stats = load_stats
        with warnings.catch_warnings():
            # torch warns about non-writable buffers; read-only is the point of the mapping.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._segment: torch.Tensor | None = torch.frombuffer(mapping, dtype=torch.uint8)
        self._finalizer = (weakref.finalize(self, unlink_if_owner, path, os.getpid())
                           if owner else None)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def build(cls, specs: Iterable[tuple[str, tuple[int, ...], str]], name: str | None = None,
              model_info: dict | None = None,
              transpose: Callable[[str], bool] = lambda _: False) -> "StoreBuilder":
        """Create a segment sized for `specs`; stream tensors in with .write(), then .finish()."""
        from rempd.shm_store.loader import StoreBuilder   # loader builds on this module
        return StoreBuilder(specs, name=name, model_info=model_info, transpose=transpose)

    @classmethod
    def create(cls, tensors: Iterable[tuple[str, torch.Tensor]], name: str | None = None,
               model_info: dict | None = None,
               transpose: Callable[[str], bool] = lambda _: False) -> "WeightStore":
        """Store tensors already in memory (small models, tests); stream big ones with build()."""
        items = list(tensors)
        specs = [(n, tuple(t.shape), str(t.dtype)) for n, t in items]
        with cls.build(specs, name=name, model_info=model_info, transpose=transpose) as builder:
            for n, t in items:
                builder.write(n, t)
            return builder.finish()

    @classmethod
    def attach(cls, name: str) -> "WeightStore":
        """Map an existing, fully loaded segment read-only. Never unlinks it, not even on exit."""
        path = shm_path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreNotFoundError(f"no weight store {path.name!r} in {path.parent}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER.size:
                raise StoreError(f"{path}: {size} bytes, not a (finished) ReMP weight store")
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)   # the mapping keeps its own reference to the file
        return cls(name, mapping, owner=False)

    @staticmethod
    def exists(name: str) -> bool:
        return shm_path(name).exists()

    # ---- reading ------------------------------------------------------------------------------

    def entry(self, name: str) -> ManifestEntry:
        return self.manifest[name]

    def names(self) -> list[str]:
        return self.manifest.names()

    def __contains__(self, name: object) -> bool:
        return name in self.manifest

    @property
    def nbytes(self) -> int:
        return self.header.segment_bytes

    def buffer(self) -> torch.Tensor:
        """The whole segment as one uint8 tensor: what a CUDA worker pins once at start."""
        if self._segment is None:
            raise StoreError(f"weight store {self.name!r} is closed")
        return self._segment

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view in the stored layout (transposed weights come back as [in, out])."""
        e = self.entry(name)
        start = self.header.data_offset + e.offset
        return self.buffer()[start:start + e.nbytes].view(e.torch_dtype).view(e.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the stored tensor: one contiguous range, cheap to copy to a GPU."""
        e = self.entry(name)
        if not e.shape:
            raise StoreError(f"tensor {name!r} is a scalar and has no rows")
        if not 0 <= start <= stop <= e.shape[0]:
            raise StoreError(f"tensor {name!r}: rows [{start}, {stop}) out of range "
                             f"for stored shape {e.shape}")
        return self.tensor(name)[start:stop]

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this handle's mapping. Views already handed out keep the memory mapped."""
        self._segment = None

    def unlink(self) -> None:
        """Remove the segment (owner only). Attached processes keep their mappings until closed."""
        if not self.owner:
            raise StoreError(f"weight store {self.name!r} was attached, not created, here: "
                             "only its owner may unlink it")
        assert self._finalizer is not None
        self._finalizer()   # unlinks now, and only once

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc: object) -> None:
        # Owner: the `with` block is the segment's lifetime. Attached: just let go of it.
        if self.owner:
            self.unlink()
        self.close()

    def __reduce__(self) -> tuple:
        raise TypeError("a WeightStore does not travel between processes: send its .name "
                        "and WeightStore.attach(name) there")

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        return (f"WeightStore({self.name!r}, {role}, {len(self.manifest)} tensors, "
                f"{self.nbytes / 1e9:.3f} GB)")
