"""The layer-ordered (in-place) transform's steps and its peak memory against the plain order's, and plan's
choice between them. Pure logic on real model shapes."""
from dataclasses import replace

import pytest

from rempd.migrate.layer_steps import build_order, free_steps, layer_steps, piece_unit, step_of_units
from rempd.migrate.plan import plan_switch
from rempd.migrate.predict import LinkSpeeds, predict
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.migrate.capacity import SwitchRefused, choose_order
from rempd.migrate.transform_memory import headrooms, kv_bytes, transform_extra
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Placement, Topology

GEO_70B = ModelGeometry(ModelConfig.from_dict(shape_config("llama2-70b")), "bfloat16")
H100 = 80 * 10**9 - (1 << 30)  # "80 GB" less the reserve every GPU keeps
ROUND = 1 << 30
FOUR = [Topology(1, 4), Topology(2, 2), Topology(4, 1)]
TWO = [Topology(1, 2), Topology(2, 1)]


def plan(geo, old: Topology, new: Topology, live_blocks: int = 64):
    p = plan_switch(geo, Placement.default(old), new, 4, live_blocks, 16)
    p.layer_steps = layer_steps(p, geo, ROUND)
    return p


def shard_bytes(geo, placement, worker) -> int:
    shard = shard_of(geo.cfg, placement, worker)
    return geo.weight_bytes(shard) if shard else 0


def peaks(geo, p, worker) -> tuple[int, int]:
    """(plain, layer order): what the worker holds at the transform's peak, its KV pool freed."""
    old = shard_bytes(geo, p.old, worker)
    return (old + transform_extra(replace(p, layer_steps=None), geo, worker, ROUND),
            old + transform_extra(p, geo, worker, ROUND))


@pytest.mark.parametrize("old", FOUR + TWO, ids=str)
@pytest.mark.parametrize("new", FOUR + TWO, ids=str)
def test_70b_on_four_80gb_gpus(old, new):
    """Plain order fits only between 4-GPU topologies; layer order fits every switch, at about the larger shard."""
    if old == new:
        return
    p = plan(GEO_70B, old, new)
    both = [peaks(GEO_70B, p, worker) for worker in range(4)]
    for worker, (plain, layered) in enumerate(both):
        larger = max(shard_bytes(GEO_70B, p.old, worker), shard_bytes(GEO_70B, p.new, worker))
        assert layered <= larger + 2 * ROUND + sum(kv_bytes(p, worker)), (worker, layered / 1e9, larger / 1e9)
        assert layered <= plain
    assert all(plain <= H100 for plain, _ in both) == (old in FOUR and new in FOUR)
    assert all(layered <= H100 for _, layered in both)


def rooms(geo, p, device_bytes: int) -> list[tuple[int, int]]:
    """Each worker's headroom on devices of `device_bytes`, KV pool freed, as the workers report it to plan."""
    return [headrooms(p, geo, w, ROUND, device_bytes - shard_bytes(geo, p.old, w)) for w in range(4)]


def test_plan_keeps_the_plain_order_where_it_fits_and_builds_layer_by_layer_where_it_does_not():
    devices = [f"cuda:{i}" for i in range(4)]
    four_to_four = plan(GEO_70B, Topology(1, 4), Topology(2, 2))
    assert choose_order("auto", Topology(2, 2), devices, rooms(GEO_70B, four_to_four, H100)) is False
    assert choose_order("always", Topology(2, 2), devices, rooms(GEO_70B, four_to_four, H100)) is True
    four_to_two = plan(GEO_70B, Topology(4, 1), Topology(2, 1))
    assert choose_order("auto", Topology(2, 1), devices, rooms(GEO_70B, four_to_two, H100)) is True
    with pytest.raises(SwitchRefused, match=r"TP2PP1: cuda:\d would run out of memory during the switch, where "
                                            r"its old and new shards coexist: 2\d\.\d GB short"):
        choose_order("never", Topology(2, 1), devices, rooms(GEO_70B, four_to_two, H100))
    # 69.3 GB hold the 69.0 GB TP2 shard, but not with a step being built beside it
    with pytest.raises(SwitchRefused, match=r"even with the new shard built layer by layer as the old one is "
                                            r"freed: \d\.\d GB short"):
        choose_order("auto", Topology(2, 1), devices, rooms(GEO_70B, four_to_two, 69_300_000_000))
    # CPU workers report no headroom: every order fits
    assert choose_order("auto", Topology(2, 1), ["cpu"] * 4, [None] * 4) is False


def test_build_order_interleaves_the_old_stages():
    """TP1PP4 → TP4PP1: every worker builds a quarter of every layer and frees whole layers of its old stage, so
    the order takes a layer from each old stage in turn; in ascending order the last stage's worker would build
    three quarters of its new shard before freeing anything."""
    p = plan(GEO_70B, Topology(1, 4), Topology(4, 1))
    order = build_order(p, GEO_70B)
    assert sorted(order) == list(range(82))
    layers = [u - 1 for u in order if 1 <= u <= 80]
    for start in range(0, 80, 4):
        assert sorted(layer // 20 for layer in layers[start:start + 4]) == [0, 1, 2, 3]
    ascending = replace(p, layer_steps=[[u] for u in range(82)])
    assert max(peaks(GEO_70B, p, w)[1] for w in range(4)) < 38e9
    assert max(peaks(GEO_70B, ascending, w)[1] for w in range(4)) > 50e9


def test_steps_cover_every_unit_and_stay_within_the_round():
    p = plan(GEO_70B, Topology(2, 2), Topology(4, 1))
    assert sorted(u for step in p.layer_steps for u in step) == list(range(82))
    built = {}
    for piece in p.weights:
        key = (step_of_units(p.layer_steps)[piece_unit(p, piece)], piece.dst)
        built[key] = built.get(key, 0) + piece.nbytes
    for (k, _), nbytes in built.items():
        assert nbytes <= ROUND or len(p.layer_steps[k]) == 1


def test_a_switch_onto_its_own_placement_needs_only_its_largest_step():
    """Everything stays: each step builds its units, copies them from the old ones and frees those."""
    p = plan(GEO_70B, Topology(2, 2), Topology(2, 2), live_blocks=0)
    for worker in range(4):
        step_of = step_of_units(p.layer_steps)
        per_step = {}
        for piece in p.weights:
            if piece.dst == worker:
                per_step[step_of[piece_unit(p, piece)]] = per_step.get(step_of[piece_unit(p, piece)], 0) + piece.nbytes
        assert transform_extra(p, GEO_70B, worker, ROUND) == max(per_step.values())


def test_a_tied_embedding_is_freed_after_the_last_stage_that_reads_it():
    """llama3-1b ties its head to the embedding: TP1PP1 → TP1PP2 reads the one old copy for the new first stage's
    embedding and for the new last stage's head; q, k and v are one allocation, freed together."""
    geo = ModelGeometry(ModelConfig.from_dict(shape_config("llama3-1b")), "bfloat16")
    p = plan(geo, Topology(1, 1), Topology(1, 2))
    holder = p.old.workers[0]
    free, step_of = free_steps(p, geo, holder, p.layer_steps), step_of_units(p.layer_steps)
    assert free["model.embed_tokens.weight"] == max(step_of[0], step_of[17])
    layer = "model.layers.3.self_attn."
    assert free[layer + "q_proj.weight"] == free[layer + "k_proj.weight"] == free[layer + "v_proj.weight"]


def test_plan_prices_a_wait_per_step_of_the_layer_order():
    p = plan(GEO_70B, Topology(4, 1), Topology(2, 1))
    links = LinkSpeeds(host_gbps=25.0, peer_gbps=100.0, local_gbps=1000.0, step_seconds=0.002)
    layered, plain = predict(p, links), predict(replace(p, layer_steps=None), links)
    assert layered["transform"] - plain["transform"] == pytest.approx(0.002 * len(p.layer_steps))
