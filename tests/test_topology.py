import pytest

from rempd.topology import (Placement, Topology, TopologyError, check_topology, kv_head_range, stage_layers,
                            valid_topologies)


def test_stage_layers_uneven_split_covers_every_layer_once():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    for layers in range(1, 12):
        for pp in range(1, layers + 1):
            ranges = stage_layers(layers, pp)
            assert [i for r in ranges for i in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("topology, reason", [
    (Topology(3, 1), "does not divide the 4 attention heads"),
    (Topology(4, 2), "more than the 4 devices"),
    (Topology(1, 9), "more than the 4 devices"),
])
def test_invalid_topologies_name_the_rule(topology, reason):
    with pytest.raises(TopologyError, match=reason):
        check_topology(topology, 4, num_heads=4, num_kv_heads=2, num_layers=5)


def test_pp_above_layers_is_refused():
    with pytest.raises(TopologyError, match="more than the 2 layers"):
        check_topology(Topology(1, 4), 4, num_heads=4, num_kv_heads=2, num_layers=2)


def test_kv_heads_replicate_when_tp_exceeds_them():
    assert [kv_head_range(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [kv_head_range(4, 2, r) for r in range(2)] == [range(0, 2), range(2, 4)]


def test_valid_topologies_of_four_devices():
    found = {str(t) for t in valid_topologies(4, num_heads=4, num_kv_heads=2, num_layers=5)}
    assert found == {"TP1PP1", "TP1PP2", "TP1PP3", "TP1PP4", "TP2PP1", "TP2PP2", "TP4PP1"}


def test_placement_coordinates():
    placement = Placement(Topology(2, 2), (3, 1, 0, 2))
    assert placement.coords(1) == (0, 1) and placement.coords(2) == (1, 1)
    assert placement.tp_group(1) == (0, 2) and placement.output_worker == 0
    with pytest.raises(TopologyError):
        Placement(Topology(2, 2), (0, 0, 1, 2))


def test_parse_reads_what_str_writes_and_refuses_other_names():
    for topology in (Topology(1, 1), Topology(2, 2), Topology(4, 1), Topology(1, 12)):
        assert Topology.parse(str(topology)) == topology
    assert Topology.parse("tp2pp1") == Topology(2, 1)
    for bad in ("TP2", "2x2", "TPaPP1", "TP2PP2PP1", ""):
        with pytest.raises(ValueError):
            Topology.parse(bad)
