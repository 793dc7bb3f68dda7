"""How a weight-store segment describes itself: a fixed header, a JSON manifest, then tensor data.

Segment layout (all integers little-endian):

    [0, HEADER.size)                 SegmentHeader: magic, version, state, owner, sizes
    [HEADER.size, + manifest_len)    Manifest as UTF-8 JSON
    [data_offset, + data_bytes)      tensor data; every tensor starts on an ALIGN boundary

Entry offsets are relative to the data region, so the manifest can be planned (and its length
known) before the data region's position is fixed. One segment name is all a reader needs.
"""
from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

MAGIC = b"REMPWST\x00"
VERSION = 1
# Page alignment: every tensor (and so every row range a shard reads) starts on its own page,
# which keeps slices friendly to cudaHostRegister'd copies and to view(dtype).
ALIGN = 4096
# magic, version, state, owner pid, owner start (clock ticks since boot), manifest len,
# data offset, data bytes
HEADER = struct.Struct("<8sIIqqQQQ")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
# safetensors spells dtypes differently; accept its names so a header can be passed through.
_ALIASES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
            "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
            "BOOL": "bool"}

TensorSpec = tuple[str, tuple[int, ...], str]


class StoreError(RuntimeError):
    """A weight-store segment that cannot be created, read or used; the message names it."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No segment of that name exists in /dev/shm."""


class SegmentState(enum.IntEnum):
    LOADING = 1   # created, tensors still being written: readers must not attach
    READY = 2     # every tensor written


def normalize_dtype(dtype: str | torch.dtype) -> str:
    """'torch.bfloat16', torch.bfloat16, 'BF16' and 'bfloat16' all become 'bfloat16'."""
    text = str(dtype).removeprefix("torch.")
    text = _ALIASES.get(text, text)
    if text not in _DTYPES:
        raise StoreError(f"unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    return text


def torch_dtype(dtype: str) -> torch.dtype:
    return _DTYPES[normalize_dtype(dtype)]


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class SegmentHeader:
    state: SegmentState
    owner_pid: int
    owner_start: int      # /proc/<pid>/stat starttime: tells a live owner from a reused pid
    manifest_len: int
    data_offset: int
    data_bytes: int

    @property
    def segment_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, int(self.state), self.owner_pid, self.owner_start,
                           self.manifest_len, self.data_offset, self.data_bytes)

    @classmethod
    def unpack(cls, raw: bytes, source: str) -> "SegmentHeader":
        if len(raw) < HEADER.size:
            raise StoreError(f"{source}: too short to be a ReMP weight store ({len(raw)} bytes)")
        magic, version, state, pid, start, mlen, doff, dbytes = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise StoreError(f"{source}: not a ReMP weight store (bad magic {magic!r})")
        if version != VERSION:
            raise StoreError(f"{source}: weight store format version {version}, "
                             f"this code reads version {VERSION}")
        try:
            state = SegmentState(state)
        except ValueError:
            raise StoreError(f"{source}: corrupt header (state {state})") from None
        return cls(state, pid, start, mlen, doff, dbytes)


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    offset: int                  # bytes from the start of the data region
    shape: tuple[int, ...]       # as stored: [in, out] for a transposed weight
    dtype: str
    nbytes: int
    transposed: bool = False     # stored as weight.T so TP slices of the input dim are row ranges

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def checkpoint_shape(self) -> tuple[int, ...]:
        """The shape the checkpoint (and nn.Linear) uses, i.e. before our transposition."""
        return tuple(reversed(self.shape)) if self.transposed else self.shape


@dataclass(frozen=True)
class Manifest:
    entries: dict[str, ManifestEntry]
    total_bytes: int                          # size of the data region, padding included
    model_info: dict = field(default_factory=dict)

    @classmethod
    def plan(cls, specs: Iterable[TensorSpec], transpose: Callable[[str], bool] = lambda _: False,
             model_info: dict | None = None) -> "Manifest":
        """Lay tensors out back to back, each ALIGN-aligned, in the order given."""
        entries: dict[str, ManifestEntry] = {}
        offset = 0
        for name, shape, dtype in specs:
            if name in entries:
                raise StoreError(f"tensor {name!r} listed twice")
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise StoreError(f"tensor {name!r}: negative dimension in {shape}")
            dtype = normalize_dtype(dtype)
            flip = bool(transpose(name))
            if flip:
                if len(shape) != 2:
                    raise StoreError(f"tensor {name!r}: only 2-D tensors can be stored "
                                     f"transposed, shape is {shape}")
                shape = (shape[1], shape[0])
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
            entries[name] = ManifestEntry(name, offset, shape, dtype, nbytes, flip)
            offset = align_up(offset + nbytes)
        return cls(entries, offset, dict(model_info or {}))

    def __getitem__(self, name: str) -> ManifestEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in the weight store "
                           f"({len(self.entries)} tensors)") from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, padding excluded."""
        return sum(e.nbytes for e in self.entries.values())

    def to_json(self) -> str:
        try:
            return json.dumps({"total_bytes": self.total_bytes, "model_info": self.model_info,
                               "entries": [asdict(e) for e in self.entries.values()]})
        except TypeError as exc:
            raise StoreError(f"model_info must be JSON-serialisable: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            entries = {}
            for e in raw["entries"]:
                entry = ManifestEntry(str(e["name"]), int(e["offset"]),
                                      tuple(int(d) for d in e["shape"]), normalize_dtype(e["dtype"]),
                                      int(e["nbytes"]), bool(e["transposed"]))
                entries[entry.name] = entry
            return cls(entries, int(raw["total_bytes"]), dict(raw.get("model_info") or {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{source}: corrupt manifest: {exc}") from exc
