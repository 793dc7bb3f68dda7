"""Plan's price of a switch: bytes over measured links, a new KV pool, the calibrated fixed cost. Pure logic."""
import pytest

from rempd.migrate.plan import plan_switch
from rempd.migrate.predict import LinkSpeeds, pool_bytes, predict
from rempd.migrate.shards import ModelGeometry
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Placement, Topology, group_member_sets, valid_topologies

GEO = ModelGeometry(ModelConfig.from_dict(shape_config("llama2-7b")), "bfloat16")
LINKS = LinkSpeeds(host_gbps=25.0, peer_gbps=100.0, local_gbps=1000.0, group_seconds=0.2, rpc_seconds=0.001)


def plan(old: Topology, new: Topology, live_blocks: int = 0):
    return plan_switch(GEO, Placement.default(old), new, 4, live_blocks, 16)


def test_four_devices_prebuild_every_pair_and_the_quad():
    sets = group_member_sets(valid_topologies(4, 32, 32, 32), 4)
    assert len(sets) == 7 and (0, 3) in sets and (0, 1, 2, 3) in sets


def test_eight_devices_prebuild_aligned_blocks_only():
    sets = group_member_sets(valid_topologies(8, 32, 32, 32), 8)
    assert sets == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3), (4, 5, 6, 7), tuple(range(8))]


def test_transform_is_the_slowest_worker_moving_its_bytes():
    p = plan(Topology(1, 4), Topology(4, 1))
    per_worker_peer = max(sum(w.nbytes for w in p.weights if w.dst == d and w.source == "peer") for d in range(4))
    per_worker_stay = max(sum(w.nbytes for w in p.weights if w.dst == d and w.source == "stay") for d in range(4))
    predicted = predict(p, LINKS)
    expected = per_worker_peer / 100e9 + per_worker_stay / 1000e9
    assert predicted["transform"] == pytest.approx(LINKS.rpc_seconds + expected, rel=0.3)
    assert predicted["total"] == pytest.approx(sum(v for k, v in predicted.items() if k != "total"))


def test_new_pool_groups_and_fixed_cost_are_priced():
    p = plan(Topology(2, 2), Topology(4, 1))
    base = predict(p, LINKS)
    pool = pool_bytes(GEO, p, num_blocks=1000, block_size=16)
    # TP4PP1: 32 layers × 8 of 32 KV heads per worker × 1000 blocks × 16 tokens × 128 dims × K,V × 2 bytes
    assert pool == 32 * 8 * 1000 * 16 * 128 * 2 * 2
    links = LinkSpeeds(**{**LINKS.to_dict(), "alloc_gbps": 500.0, "fixed_seconds": 0.25})
    priced = predict(p, links, new_groups=2, new_pool_bytes=pool)
    assert priced["transform"] - base["transform"] == pytest.approx(2 * pool / 500e9 + 0.25)
    assert priced["groups"] - base["groups"] == pytest.approx(2 * 0.2)


def test_learning_moves_the_fixed_cost_toward_what_switches_measure():
    links = LinkSpeeds(1.0, 1.0, 1.0, fixed_seconds=0.2)
    for _ in range(12):  # every switch spends 0.5 s beyond its bytes
        links.learn(0.5 - links.fixed_seconds)
    assert links.fixed_seconds == pytest.approx(0.5, abs=0.01)
    links.learn(-10.0)
    assert links.fixed_seconds == 0.0


def test_graph_capture_is_priced_per_layer_of_the_largest_new_stage_and_per_bucket_captured():
    links = LinkSpeeds(**{**LINKS.to_dict(), "graph_seconds_per_layer": 0.01})
    to_pp4, to_tp4 = plan(Topology(4, 1), Topology(1, 4)), plan(Topology(1, 4), Topology(4, 1))
    assert predict(to_pp4, links, graph_buckets=1)["commit"] == pytest.approx(LINKS.rpc_seconds + 8 * 0.01)
    assert predict(to_tp4, links, graph_buckets=2)["commit"] == pytest.approx(LINKS.rpc_seconds + 2 * 32 * 0.01)
    assert predict(to_tp4, links)["commit"] == pytest.approx(LINKS.rpc_seconds)  # no live batch, nothing captured
