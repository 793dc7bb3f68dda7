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


def test_peak_memory_counts_new_shard_packed_kv_and_two_rounds():
    new_bytes = GEO.weight_bytes(shard_of(GEO.cfg, PLAN.new, 0))
    small, large = transform_bytes(PLAN, 0, new_bytes, 64 << 20), transform_bytes(PLAN, 0, new_bytes, 1 << 40)
    packed = sum(PLAN.kv_bytes(p) for p in PLAN.kv if p.src == 0)
    exchanged = sum(p.nbytes for p in PLAN.weights if p.source == "peer" and 0 in (p.src, p.dst))
    exchanged += sum(PLAN.kv_bytes(p) for p in PLAN.kv if p.source == "peer" and p.dst == 0)
    assert large == new_bytes + packed + exchanged
    assert new_bytes + packed < small < large
