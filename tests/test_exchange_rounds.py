"""How a switch's peer transfers are cut into rounds, and the memory a worker needs at the transform's peak."""
from rempd.migrate.plan import plan_switch
from rempd.migrate.reshard import exchange_rounds
from rempd.migrate.transform_memory import transform_bytes
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Placement, Topology

GEO = ModelGeometry(ModelConfig.from_dict(shape_config("llama2-7b")), "bfloat16")
PLAN = plan_switch(GEO, Placement.default(Topology(1, 4)), Topology(4, 1), 4, num_live_blocks=300, block_size=16)


def sizes(key):
    kind, i = key
    return PLAN.weights[i].nbytes if kind == "w" else PLAN.kv_bytes(PLAN.kv[i])


def test_rounds_carry_every_peer_piece_once_in_plan_order():
    rounds = exchange_rounds(PLAN, round_bytes=256 << 20)
    flat = [key for r in rounds for key in r]
    expected = [("w", i) for i, p in enumerate(PLAN.weights) if p.source == "peer"]
    expected += [("kv", i) for i, p in enumerate(PLAN.kv) if p.source == "peer"]
    assert flat == expected and len(rounds) > 10
    largest = max(sizes(k) for k in flat)
    assert all(sum(sizes(k) for k in r) < (256 << 20) + largest for r in rounds)


def test_one_round_when_everything_fits():
    assert len(exchange_rounds(PLAN, round_bytes=1 << 40)) == 1


def peer_bytes(plan, me):
    """(weights moved through `me`, KV it sends, KV it receives) between peers."""
    moved = sum(p.nbytes for p in plan.weights if p.source == "peer" and me in (p.src, p.dst))
    sent = sum(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.src == me)
    received = sum(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.dst == me)
    return moved, sent, received


def test_peak_memory_counts_new_shard_packed_and_received_kv_and_two_rounds():
    new_bytes = GEO.weight_bytes(shard_of(GEO.cfg, PLAN.new, 0))
    small, large = transform_bytes(PLAN, 0, new_bytes, 64 << 20), transform_bytes(PLAN, 0, new_bytes, 1 << 40)
    packed = sum(PLAN.kv_bytes(p) for p in PLAN.kv if p.src == 0)
    moved, sent, received = peer_bytes(PLAN, 0)
    assert large == new_bytes + packed + received + moved + sent
    assert new_bytes + packed + received < small < large


def test_a_worker_that_leaves_is_priced_for_the_kv_it_sends():
    """Regression (GPU soak, 4 × H100): TP2PP2 → TP1PP2 under load ran out of memory allocating a 1 GiB buffer of
    KV for a peer, which plan had priced at nothing: a worker leaving the topology builds no weights, and the KV
    it sends was not counted."""
    plan = plan_switch(GEO, Placement.default(Topology(2, 2)), Topology(1, 2), 4, num_live_blocks=520,
                       block_size=16)
    leaving = [w for w in plan.old.workers if shard_of(GEO.cfg, plan.new, w) is None]
    assert leaving
    for me in leaving:
        packed = sum(plan.kv_bytes(p) for p in plan.kv if p.src == me)
        _, sent, received = peer_bytes(plan, me)
        largest = max(plan.kv_bytes(p) for p in plan.kv if p.source == "peer" and p.src == me)
        assert sent >= 1 << 30 and received == 0
        assert transform_bytes(plan, me, 0, 256 << 20) >= packed + min(sent, 256 << 20) + largest
