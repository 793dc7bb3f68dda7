"""The daemon's configuration: defaults, then a TOML file, then command-line flags (highest).

Every `rempd serve` flag is a key in the file, spelt either way (`kv-cache-memory` or
`kv_cache_memory`). Unknown keys and bad values fail start-up with the file and key named, so a
typo cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rempd.config_values import (boolean, group_name, optional, parse_devices, parse_size, positive, strict,
                                  topology_names)
from rempd.engine.config import EngineConfig

DEFAULT_CONFIG_PATH = Path("/etc/remp/rempd.toml")
DEFAULT_SOCKET = "/run/remp/rempd.sock"
DEFAULT_STATE_DIR = "/var/lib/remp"  # systemd's StateDirectory=remp
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration the daemon cannot start with; the message names the source and the key."""


def _opt(default: Any, parse: Callable[[Any], Any], help: str, repr: bool = True) -> Any:
    return field(default=default, repr=repr, metadata={"parse": parse, "help": help})


@dataclass
class DaemonConfig:
    model: str | None = _opt(None, optional(strict(str)), "model directory (Hugging Face layout)")
    devices: list[int] = field(default_factory=list, metadata={
        "parse": parse_devices, "help": "CUDA device ids the daemon owns, e.g. 0,1,2,3"})
    cpu_workers: int = _opt(0, strict(int), "number of CPU workers when no --devices are given")
    tp: int = _opt(1, strict(int), "tensor-parallel degree at start")
    pp: int = _opt(1, strict(int), "pipeline-parallel degree at start")
    dtype: str | None = _opt(None, optional(strict(str)),
                             "float32, float16 or bfloat16; the checkpoint's own if unset")
    host: str = _opt("127.0.0.1", strict(str), "address of the OpenAI-compatible API")
    port: int = _opt(8000, strict(int), "port of the OpenAI-compatible API (0 picks a free one)")
    socket: str = _opt(DEFAULT_SOCKET, strict(str), "path of the control socket")
    socket_group: str | None = _opt(None, optional(group_name), "group (name or gid) allowed on the control socket")
    api_key: str | None = _opt(None, optional(strict(str)), "require 'Authorization: Bearer KEY' on /v1",
                               repr=False)  # kept out of logs
    served_model_name: str | None = _opt(None, optional(strict(str)),
                                         "model id in the API; the model directory's name if unset")
    kv_cache_memory: int = _opt(EngineConfig.kv_cache_memory, parse_size, "KV pool per CPU worker, e.g. 64MiB")
    gpu_memory_utilization: float = _opt(EngineConfig.gpu_memory_utilization, strict(float),
                                         "share of each GPU's memory rempd may use")
    max_num_seqs: int = _opt(EngineConfig.max_num_seqs, strict(int), "most requests in one batch")
    max_num_batched_tokens: int = _opt(EngineConfig.max_num_batched_tokens, strict(int), "token budget of one step")
    max_model_len: int | None = _opt(None, optional(strict(int)), "context length; the model's own if unset")
    block_size: int = _opt(EngineConfig.block_size, strict(int), "tokens per KV block")
    switch_round_bytes: int = _opt(EngineConfig.switch_round_bytes, parse_size, "a switch moves weights between "
                                   "devices in rounds of this size: smaller needs less memory beside the old and "
                                   "new shards")
    switch_in_place: str = _opt(EngineConfig.switch_in_place, strict(str), "build a switch's new shards layer by "
                                "layer, freeing old layers as they go: auto (when old and new shards do not fit side "
                                "by side), always, never")
    switch_mode: str = _opt(EngineConfig.switch_mode, strict(str), "how a switch runs unless its request says: "
                            "stop_the_world, or staged (the old topology serves while the new one is prepared; "
                            "stop-the-world if it cannot fit)")
    staging_memory: int | None = _opt(None, optional(parse_size), "memory per worker a staged switch may use "
                                      "(0: never stage); free device memory on GPUs, the KV budget on CPU if unset")
    staging_chunk_bytes: int | None = _opt(None, optional(parse_size), "most bytes a worker moves between two "
                                           "steps while staging; 256MiB on GPUs, 64KiB on CPU if unset")
    async_tokens: bool = _opt(EngineConfig.async_tokens, boolean, "send each decode step before the tokens it "
                              "embeds reach the host (the workers hand them to the first stage on the device)")
    drain_timeout: float = _opt(30.0, strict(float), "seconds running requests may take to finish on SIGTERM")
    state_dir: str = _opt(DEFAULT_STATE_DIR, strict(str), "where rempd keeps state (profiles/ per model and devices)")
    policy: str = _opt("manual", strict(str), "topology policy at start: manual, or auto (needs profiles)")
    slo_ttft: float = _opt(1.0, positive, "policy objective: p90 time to first token, seconds")
    slo_itl: float = _opt(0.1, positive, "policy objective: p90 over requests of each one's inter-token latency, "
                          "(last token - first) / (tokens - 1), seconds")
    policy_window: float = _opt(30.0, positive, "seconds of observations the policy looks at")
    policy_dwell: float = _opt(60.0, positive, "least seconds between two switches the policy starts")
    policy_interval: float = _opt(1.0, positive, "seconds between two policy decisions")
    policy_hysteresis: float = _opt(0.1, strict(float), "gain (in SLO units) a switch must bring beyond its cost")
    policy_topologies: list[str] | None = _opt(None, optional(topology_names),
                                               "topologies the policy may choose, e.g. TP4PP1,TP1PP4; all if unset")
    policy_learn: bool = _opt(True, boolean, "refine profiles from what is observed while serving")
    worker_timeout: float = _opt(EngineConfig.worker_timeout, strict(float), "seconds a worker may take to answer "
                                 "before it is taken for hung and every worker is restarted")
    max_request_bytes: int = _opt(DEFAULT_MAX_REQUEST_BYTES, parse_size,
                                  "largest request body the serving API reads, e.g. 1MiB")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, file: Path | None = None, flags: Mapping[str, Any] | None = None) -> "DaemonConfig":
        """Defaults, then `file` (if any), then the flags that were given (None means not given)."""
        values: dict[str, Any] = {}
        if file is not None:
            values.update(_read_file(file))
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        values.update(_coerce(given, "command line", "--{}"))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        problems = []
        if not self.model:
            problems.append("no model: give --model or `model = \"/path\"` in the config file")
        if self.devices and self.cpu_workers:
            problems.append("give either --devices or --cpu-workers, not both")
        if not self.devices and self.cpu_workers < 1:
            problems.append("no devices: give --devices 0,1,... (GPUs) or --cpu-workers N")
        for name in ("tp", "pp", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        num_devices = len(self.devices) or self.cpu_workers
        if num_devices and self.tp * self.pp > num_devices:
            problems.append(f"tp·pp = {self.tp * self.pp} needs more than the {num_devices} devices given")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append("max_model_len must be at least 2")
        if self.switch_mode not in ("staged", "stop_the_world"):
            problems.append(f"switch_mode {self.switch_mode!r} is not staged or stop_the_world")
        if self.switch_in_place not in ("auto", "always", "never"):
            problems.append(f"switch_in_place {self.switch_in_place!r} is not auto, always or never")
        if self.worker_timeout <= 0:
            problems.append("worker_timeout must be positive")
        if self.max_request_bytes < 1024:
            problems.append("max_request_bytes must be at least 1KiB")
        if self.drain_timeout < 0:
            problems.append("drain_timeout cannot be negative")
        if not self.socket.startswith("/"):
            problems.append(f"socket {self.socket!r} must be an absolute path")
        if self.policy not in ("manual", "auto"):
            problems.append(f"policy {self.policy!r} is not manual or auto")
        if self.policy_hysteresis < 0:
            problems.append("policy_hysteresis cannot be negative")
        if self.api_key == "":
            problems.append("api_key is empty")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model or "").name

    def engine_config(self) -> EngineConfig:
        assert self.model, "validate() first"
        return EngineConfig(
            model_dir=self.model, tp=self.tp, pp=self.pp, devices=list(self.devices),
            cpu_workers=self.cpu_workers, dtype=self.dtype, block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory, gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, switch_round_bytes=self.switch_round_bytes,
            switch_mode=self.switch_mode, switch_in_place=self.switch_in_place, staging_memory=self.staging_memory,
            staging_chunk_bytes=self.staging_chunk_bytes, worker_timeout=self.worker_timeout,
            async_tokens=self.async_tokens)


def find_config_file(explicit: Path | None, default: Path = DEFAULT_CONFIG_PATH) -> Path | None:
    """--config if given (it must exist), else the default path when it is there."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: no such config file")
        return explicit
    return default if default.is_file() else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values = _coerce({k.replace("-", "_"): v for k, v in raw.items()}, str(path), "{}")
    model = values.get("model")
    if model and not Path(model).is_absolute():
        # systemd starts us in /, so a relative path can only sensibly mean "next to the file"
        values["model"] = str((path.parent / model).resolve())
    return values


def _coerce(values: Mapping[str, Any], source: str, spelling: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(k.replace("_", "-") for k in fields)
            raise ConfigError(f"{source}: unknown key {key!r} (known: {known})")
        try:
            out[key] = fields[key].metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {spelling.format(key.replace('_', '-'))}: {exc}") from None
    return out
