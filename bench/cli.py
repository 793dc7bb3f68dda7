"""What the GPU benchmarks share on their command line: the model shape, devices, topologies and load, and the
checkpoint of that shape (made once, then reused from --checkpoints)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_matrix_args(ap: argparse.ArgumentParser, topologies: list[str], max_tokens: int) -> None:
    ap.add_argument("--shape", required=True)
    ap.add_argument("--devices", default="0,1,2,3")
    ap.add_argument("--topologies", default=",".join(topologies))
    ap.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "remp-checkpoints"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)


def ensure_checkpoint(checkpoints: str, shape: str) -> Path:
    """The checkpoint of `shape` under `checkpoints`, written first if it is not there."""
    model = Path(checkpoints) / shape
    if not (model / "config.json").exists():
        from rempd.model.make_checkpoint import make_checkpoint
        make_checkpoint(shape, model)
    return model
