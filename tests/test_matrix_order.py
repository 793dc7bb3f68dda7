"""The switch matrix visits every ordered pair of topologies once, each cell starting where the last one ended, over
topologies that default to the device count."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cli import device_count, matrix_topologies  # noqa: E402
from switch_matrix import TOPOLOGIES, cell_order  # noqa: E402


def test_every_ordered_pair_once_and_no_switch_between_cells():
    topologies = ["TP1PP4", "TP2PP2", "TP4PP1", "TP1PP2", "TP2PP1"]
    cells = cell_order(topologies)
    assert sorted(cells) == sorted((a, b) for a in topologies for b in topologies if a != b)
    assert cells[0][0] == topologies[0]  # where the daemon starts
    assert all(before[1] == after[0] for before, after in zip(cells, cells[1:]))


def test_two_topologies():
    assert cell_order(["TP1PP2", "TP2PP1"]) == [("TP1PP2", "TP2PP1"), ("TP2PP1", "TP1PP2")]


def test_default_topologies_follow_the_device_count():
    def default(devices: str) -> list[str]:
        return matrix_topologies(argparse.Namespace(devices=devices, topologies=None), TOPOLOGIES)

    assert default("0,1,2,3") == default("cpu") == TOPOLOGIES  # the set the 4-GPU results used
    assert default("0,1,2,3,4,5,6,7") == default("cpu:8") == ["TP1PP8", "TP2PP4", "TP4PP2", "TP8PP1"]
    assert default("0,1") == ["TP1PP2", "TP2PP1"]
    assert matrix_topologies(argparse.Namespace(devices="cpu:8", topologies="TP2PP2,TP1PP8"), TOPOLOGIES) == [
        "TP2PP2", "TP1PP8"]
    assert (device_count("cpu"), device_count("cpu:8"), device_count("4,5,6")) == (4, 8, 3)
    assert len(cell_order(default("cpu:8"))) == 12
