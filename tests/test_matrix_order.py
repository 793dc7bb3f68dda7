"""The switch matrix visits every ordered pair of topologies once, each cell starting where the last one ended."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from switch_matrix import cell_order  # noqa: E402


def test_every_ordered_pair_once_and_no_switch_between_cells():
    topologies = ["TP1PP4", "TP2PP2", "TP4PP1", "TP1PP2", "TP2PP1"]
    cells = cell_order(topologies)
    assert sorted(cells) == sorted((a, b) for a in topologies for b in topologies if a != b)
    assert cells[0][0] == topologies[0]  # where the daemon starts
    assert all(before[1] == after[0] for before, after in zip(cells, cells[1:]))


def test_two_topologies():
    assert cell_order(["TP1PP2", "TP2PP1"]) == [("TP1PP2", "TP2PP1"), ("TP2PP1", "TP1PP2")]
