"""Plan's price of a switch: bytes over measured links, and costs learned per phase and pool regime. Pure logic."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rempd.migrate.plan import plan_switch
from rempd.migrate.predict import LEARNING_RATE, LinkSpeeds, Price, phases_of, predict, price
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


def test_each_pool_regime_adds_its_own_learned_cost_and_groups_are_priced():
    links = LinkSpeeds(**{**LINKS.to_dict(), "fixed_seconds": 0.05, "fresh_pool_seconds": 0.3, "leave_seconds": 0.1})
    same_workers, shrink = plan(Topology(2, 2), Topology(4, 1)), plan(Topology(4, 1), Topology(2, 1))
    bare = {name: predict(p, LINKS)["transform"] for name, p in (("same", same_workers), ("shrink", shrink))}
    assert predict(same_workers, links)["transform"] - bare["same"] == pytest.approx(0.05)
    assert predict(same_workers, links, fresh_pool=True)["transform"] - bare["same"] == pytest.approx(0.05 + 0.3)
    # workers 2 and 3 leave: they free their pool and weights even where the others keep theirs
    assert predict(shrink, links)["transform"] - bare["shrink"] == pytest.approx(0.05 + 0.1)
    assert predict(shrink, links, fresh_pool=True)["transform"] - bare["shrink"] == pytest.approx(0.05 + 0.3)
    assert predict(same_workers, links, new_groups=2)["groups"] == pytest.approx(LINKS.rpc_seconds + 2 * 0.2)


def test_plan_and_quiesce_are_priced_as_learned_and_at_least_a_round_trip():
    links = LinkSpeeds(**{**LINKS.to_dict(), "plan_seconds": 0.04, "quiesce_seconds": 0.0})
    predicted = predict(plan(Topology(2, 2), Topology(4, 1)), links)
    assert predicted["plan"] == 0.04 and predicted["quiesce"] == LINKS.rpc_seconds


def measured_as(links: LinkSpeeds, price: Price, **costs: float) -> dict[str, float]:
    """Phases a switch would measure if it cost `costs` beyond its bytes."""
    transform = links.rpc_seconds + price.moved_seconds + costs["fixed"] + costs.get("pool", 0.0)
    return {"plan": costs["plan"], "quiesce": 0.01, "groups": 0.001, "transform": transform, "commit": 0.02}


def test_learning_keeps_the_kept_and_fresh_pool_regimes_apart():
    """Switches alternating between a kept pool (0.05 s beyond bytes) and a fresh one (0.35 s): each regime's cost
    converges to its own, where one shared residual would swing between them and mispredict both."""
    links = LinkSpeeds(**{**LINKS.to_dict(), "fixed_seconds": 0.2})
    kept = price(plan(Topology(2, 2), Topology(4, 1)), links)
    fresh = price(plan(Topology(4, 1), Topology(2, 2)), links, fresh_pool=True)
    for _ in range(20):
        links.learn(kept, measured_as(links, kept, fixed=0.05, plan=0.03))
        links.learn(fresh, measured_as(links, fresh, fixed=0.05, pool=0.3, plan=0.03))
    assert links.fixed_seconds == pytest.approx(0.05, abs=1e-3)
    assert links.fresh_pool_seconds == pytest.approx(0.3, abs=1e-3)
    assert links.plan_seconds == pytest.approx(0.03) and links.quiesce_seconds == pytest.approx(0.01)
    for p in (kept, fresh):
        said = phases_of(p, links)
        assert said["transform"] == pytest.approx(measured_as(links, p, fixed=0.05, pool=0.3 * p.fresh_pool,
                                                              plan=0.03)["transform"], abs=1e-3)


def test_a_shrinking_kept_pool_switch_teaches_the_leave_cost_only():
    links = LinkSpeeds(**{**LINKS.to_dict(), "fixed_seconds": 0.05, "fresh_pool_seconds": 0.3})
    shrink = price(plan(Topology(4, 1), Topology(2, 1)), links)
    assert shrink.workers_leave and not shrink.fresh_pool
    links.learn(shrink, measured_as(links, shrink, fixed=0.05, pool=0.2, plan=0.03), rate=1.0)
    assert (links.fixed_seconds, links.fresh_pool_seconds) == (0.05, 0.3)
    assert links.leave_seconds == pytest.approx(0.2)


def test_learning_moves_a_share_of_the_way_and_never_below_zero():
    links = LinkSpeeds(**{**LINKS.to_dict(), "fixed_seconds": 0.2})
    kept = price(plan(Topology(2, 2), Topology(4, 1)), links)
    links.learn(kept, measured_as(links, kept, fixed=0.6, plan=0.0))
    assert links.fixed_seconds == pytest.approx(0.2 + LEARNING_RATE * 0.4)
    links.learn(kept, {"transform": 0.0}, rate=1.0)
    assert links.fixed_seconds == 0.0


def test_graph_capture_is_learned_per_layer_and_bucket_captured():
    links = LinkSpeeds(**{**LINKS.to_dict(), "graph_seconds_per_layer": 0.01})
    to_tp4 = price(plan(Topology(1, 4), Topology(4, 1)), links, graph_buckets=2)
    assert to_tp4.graph_layers == 2 * 32
    links.learn(to_tp4, {"transform": 1.0}, graph_capture=0.02 * 64, rate=1.0)
    assert links.graph_seconds_per_layer == pytest.approx(0.02)
    links.learn(price(plan(Topology(1, 4), Topology(4, 1)), links), {"transform": 1.0}, graph_capture=0.0)
    assert links.graph_seconds_per_layer == pytest.approx(0.02)  # nothing captured: nothing learned


def test_graph_capture_is_priced_per_layer_of_the_largest_new_stage_and_per_bucket_captured():
    links = LinkSpeeds(**{**LINKS.to_dict(), "graph_seconds_per_layer": 0.01})
    to_pp4, to_tp4 = plan(Topology(4, 1), Topology(1, 4)), plan(Topology(1, 4), Topology(4, 1))
    assert predict(to_pp4, links, graph_buckets=1)["commit"] == pytest.approx(LINKS.rpc_seconds + 8 * 0.01)
    assert predict(to_tp4, links, graph_buckets=2)["commit"] == pytest.approx(LINKS.rpc_seconds + 2 * 32 * 0.01)
    assert predict(to_tp4, links)["commit"] == pytest.approx(LINKS.rpc_seconds)  # no live batch, nothing captured


def test_replaying_recorded_switch_matrices_beats_what_the_daemon_predicted_then(monkeypatch):
    """bench/predict_replay.py on real 4× H100 runs: the model on the path predicts more switches within ±25 %
    than the single learned fixed cost the daemon had (its recorded predictions)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("predict_replay", root / "bench" / "predict_replay.py")
    replay = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "predict_replay", replay)  # its dataclasses look their module up
    spec.loader.exec_module(replay)
    for name in ("switch_matrix_llama2-7b_h100x4_s6.json", "switch_matrix_llama2-70b_h100x4_s5.json"):
        rows = replay.replay(json.loads((root / "bench" / "results" / name).read_text()))
        replayed = sum(abs(said / measured - 1) <= 0.25 for _, measured, said, _ in rows)
        recorded = sum(abs(said / measured - 1) <= 0.25 for _, measured, _, said in rows)
        assert replayed > recorded, (name, replayed, recorded)
    # a run of the model on the path (session 7, 32B) replays to exactly what the daemon predicted
    recorded_run = root / "bench" / "results" / "switch_matrix_qwen2.5-32b_h100x4_s7.json"
    rows = replay.replay(json.loads(recorded_run.read_text()))
    assert len(rows) == 20 and all(abs(said - recorded) < 1e-9 for _, _, said, recorded in rows), rows
