import os
from pathlib import Path

import pytest

# Four gloo workers share two cores in CI: one thread each keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny generated checkpoints, made once per test session."""
    from rempd.model.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {shape: make_checkpoint(shape, root / shape, seed=0) for shape in ("tiny-llama", "tiny-qwen2")}
