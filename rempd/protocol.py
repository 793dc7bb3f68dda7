"""Wire types of the control API, shared by rempd and rempctl.

This module must stay stdlib-only: rempctl imports it and must start fast and never load torch.
Every type is a dataclass that turns into plain JSON with `to_dict` and back with `from_dict`.
Decoding ignores fields it does not know, so an older rempctl can read a newer daemon's answer
within one API_VERSION; a change that breaks readers bumps API_VERSION.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

API_VERSION = 1

# recovering: serving, but a worker died and the pool is being rebuilt (requests wait, /health is 503)
DaemonState = Literal["starting", "serving", "recovering", "draining", "failed"]
WorkerState = Literal["active", "standby", "dead", "restarting"]

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that does not fit the protocol: wrong version, missing or mistyped field."""


@dataclass
class Message:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return _decode(cls, data, cls.__name__)


@dataclass
class ErrorInfo(Message):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


@dataclass
class ErrorResponse(Message):
    """The body of every non-2xx answer, on both APIs (OpenAI's shape)."""
    error: ErrorInfo


@dataclass
class TopologyInfo(Message):
    tp: int
    pp: int


@dataclass
class WorkerStatus(Message):
    index: int
    device: str  # "cuda:0", "cpu"
    pid: int | None
    state: WorkerState
    pp_rank: int | None  # None while it stands by
    tp_rank: int | None
    weight_bytes: int
    kv_blocks: int
    # GPU: the device's memory and utilisation (NVML); CPU: the worker's RSS, host memory, its CPU %.
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_pct: float | None = None


@dataclass
class PolicyDecision(Message):
    time: float  # wall clock
    action: Literal["stay", "hold", "switch"]
    current: str
    target: str | None
    reason: str


@dataclass
class PolicyStatus(Message):
    mode: Literal["auto", "manual"]
    slo_ttft: float
    slo_itl: float
    load: float | None = None  # requests/s of the profiles' shape, as the policy last saw it
    profiled: list[str] = field(default_factory=list)
    decision: PolicyDecision | None = None  # the latest distinct decision


@dataclass
class StatusResponse(Message):
    api_version: int
    version: str  # rempd's package version
    state: DaemonState
    pid: int
    uptime_s: float
    model: str | None = None  # None until the engine is up
    max_model_len: int | None = None
    progress: str | None = None  # what start-up is doing, while state is "starting"
    topology: TopologyInfo | None = None
    placement: list[int] = field(default_factory=list)  # worker index per (pp_rank, tp_rank)
    workers: list[WorkerStatus] = field(default_factory=list)
    requests_running: int = 0
    requests_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_usage: float = 0.0  # 0..1
    num_preempted: int = 0
    num_recoveries: int = 0
    policy: PolicyStatus | None = None
    lost_devices: list[str] = field(default_factory=list)  # devices dropped because their worker cannot start
    last_recovery: str | None = None  # what the last worker recovery did, in words

    @classmethod
    def from_dict(cls, data: Any) -> "StatusResponse":
        version = data.get("api_version") if isinstance(data, dict) else None
        if version != API_VERSION:
            raise ProtocolError(f"the daemon speaks control API version {version}; "
                                f"this client speaks version {API_VERSION}")
        return _decode(cls, data, cls.__name__)


def _decode(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the type annotation `tp` and build dataclasses on the way."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _decode(option, value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {value!r} is not a {_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ProtocolError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {value!r}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {f.name!r}")
        return typing.cast(Any, tp)(**kwargs)
    if tp is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        # bool is an int in Python but not on the wire
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"{where}: protocol.py cannot decode {tp!r}")


def _name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
