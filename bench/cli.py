"""What the GPU benchmarks share on their command line: the model shape, devices, topologies and load, and the
checkpoint of that shape (made once, then reused from --checkpoints)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_matrix_args(ap: argparse.ArgumentParser, max_tokens: int) -> None:
    ap.add_argument("--shape", required=True)
    ap.add_argument("--devices", default="0,1,2,3", help="CUDA ids, or cpu (4 CPU workers), or cpu:N")
    ap.add_argument("--topologies", help="comma-separated, e.g. TP1PP4,TP2PP2 (default: see matrix_topologies)")
    ap.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "remp-checkpoints"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)


def device_count(devices: str) -> int:
    """How many devices --devices names: "0,1,2,3" → 4, "cpu" → 4 CPU workers, "cpu:8" → 8."""
    if devices.startswith("cpu"):
        return int(devices.partition(":")[2] or 4)
    return len(devices.split(","))


def matrix_topologies(args: argparse.Namespace, four_devices: list[str]) -> list[str]:
    """--topologies if given; else on 4 devices the set the 4-GPU results used, else every TP×PP that uses all the
    devices, tp a power of two: on 8, the paper's TP1PP8, TP2PP4, TP4PP2, TP8PP1."""
    if args.topologies:
        return args.topologies.split(",")
    count = device_count(args.devices)
    if count == 4:
        return four_devices
    return [f"TP{tp}PP{count // tp}" for tp in (1 << k for k in range(count.bit_length())) if count % tp == 0]


def ensure_checkpoint(checkpoints: str, shape: str) -> Path:
    """The checkpoint of `shape` under `checkpoints`, written first if it is not there."""
    model = Path(checkpoints) / shape
    if not (model / "config.json").exists():
        from rempd.model.make_checkpoint import make_checkpoint
        make_checkpoint(shape, model)
    return model
