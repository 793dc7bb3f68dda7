"""The offline API refuses what it cannot run with the named error, before it loads or spawns anything."""
import shutil
from pathlib import Path

import pytest

from rempd import LLM
from rempd.model.config import CheckpointError
from rempd.topology import TopologyError


def remp_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("remp-*")}


@pytest.mark.parametrize("tp, pp, workers, reason", [
    (3, 1, 4, "does not divide the 4 attention heads"),
    (4, 2, 4, "more than the 4 devices"),
    (1, 5, 5, "more than the 4 layers"),
])
def test_invalid_topology(checkpoints, tp, pp, workers, reason):
    before = remp_segments()
    with pytest.raises(TopologyError, match=reason):
        LLM(checkpoints["tiny-llama"], tp=tp, pp=pp, cpu_workers=workers)
    assert remp_segments() == before


def test_bad_checkpoint_names_the_tensor(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["tiny-llama"], broken)
    config = (broken / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
    (broken / "config.json").write_text(config)
    before = remp_segments()
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        LLM(broken, tp=1, pp=1)
    assert remp_segments() == before
