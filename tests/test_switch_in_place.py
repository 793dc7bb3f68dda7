"""Layer-ordered (in-place) switches on 4 gloo workers: chosen by plan where old and new shards do not fit side by
side (a real daemon under a CPU memory budget, streams through the openai client), or forced (the offline engine,
whose workers' logs show each old allocation freed, and really gone, before later layers are built)."""
import asyncio

from rempd import LLM, SamplingParams
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Topology
from rempd.worker_pool.device_memory import CPU_DEVICE_BYTES_ENV
from test_switch_live import stream_through_switches
from token_log import TokenLog

PROMPTS = [f"Stream {i}: hello" for i in range(4)]
MAX_TOKENS = 40
# tiny-llama in float32 holds 232 KB a worker at TP4PP1 and 428 KB at TP2PP1 or TP1PP2. With these streams' KV
# (at most 24 blocks), switching between 2 and 4 devices needs at most 820 KB in layer order and at least 855 KB
# with old and new shards side by side; TP1PP1's 854 KB shard leaves no room for a step beside it.
BUDGET = 830_000


def test_plan_builds_layer_by_layer_where_old_and_new_shards_do_not_fit(checkpoints, start_daemon):
    daemon = start_daemon(checkpoints["tiny-llama"], tp=4, pp=1, env={CPU_DEVICE_BYTES_ENV: str(BUDGET)},
                          extra=["--switch-round-bytes", "64KiB"])
    reference, _ = asyncio.run(stream_through_switches(daemon, [], PROMPTS, MAX_TOKENS))
    with daemon.control() as ctl:
        refused = ctl.post("/v1/plan", json={"tp": 1, "pp": 1})
        assert refused.status_code == 400
        assert "even with the new shard built layer by layer" in refused.json()["error"]["message"]
        assert ctl.post("/v1/plan", json={"tp": 2, "pp": 1}).json()["in_place"] is True
    # 4 → 2 devices changing TP, 2 → 2 changing both, 2 → 4 changing PP, then back to the start
    targets = [{"tp": 2, "pp": 1}, {"tp": 1, "pp": 2}, {"tp": 1, "pp": 4}, {"tp": 2, "pp": 2}, {"tp": 4, "pp": 1}]
    texts, reports = asyncio.run(stream_through_switches(daemon, targets, PROMPTS, MAX_TOKENS))
    assert [r["state"] for r in reports] == ["committed"] * len(targets), [r["error"] for r in reports]
    assert [r["in_place"] for r in reports[:3]] == [True, True, True]
    assert reports[0]["requests_live"] == len(PROMPTS) and reports[0]["kv_blocks_migrated"] > 0
    assert texts == reference
    with daemon.control() as ctl:
        assert ctl.get("/v1/status").json()["topology"] == {"tp": 4, "pp": 1}


def held_curve(log: list[tuple]) -> int:
    """The most bytes of new tensors beyond the old allocations freed, at any point of a worker's log."""
    held = peak = 0
    for event in log:
        held += event[3] if event[0] == "build" else -event[3]
        peak = max(peak, held)
    return peak


def check_log(log: list[tuple], old_bytes: int, new_bytes: int) -> None:
    """Every old allocation freed and gone, right after its step, before any later step builds."""
    frees = [event for event in log if event[0] == "free"]
    assert all(released for *_, released in frees), frees
    assert sum(event[3] for event in frees) == old_bytes
    assert sum(event[3] for event in log if event[0] == "build") == new_bytes
    steps = [event[1] for event in log]
    assert steps == sorted(steps), log
    for before, after in zip(log, log[1:]):  # within a step, its builds come first, then its frees
        assert not (before[0] == "free" and after[0] == "build" and before[1] == after[1]), log
    if old_bytes and new_bytes:
        assert held_curve(log) < new_bytes, log  # never the whole new shard beside the old one


def test_forced_layer_order_frees_old_layers_before_later_ones_are_built(checkpoints):
    geo = ModelGeometry(ModelConfig.from_dict(shape_config("tiny-llama")), "float32")
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[1] + [(7 * i + 3 * j) % 500 + 5 for j in range(5 + 9 * i)] for i in range(4)]
    with LLM(checkpoints["tiny-llama"], tp=4, pp=1, cpu_workers=4, switch_in_place="always",
             switch_round_bytes=32 << 10) as llm:
        reference = [o.token_ids for o in llm.generate(prompts, greedy)]
        engine = llm.engine
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy)
        got = TokenLog()
        for tp, pp in [(2, 1), (1, 4), (2, 2), (4, 1)]:  # 4 → 2, 2 → 4 devices, then PP and TP change on 4
            got.steps(engine, 3)
            old = engine.placement
            report = got.switch(engine, Topology(tp, pp))
            assert report.state == "committed" and report.in_place, report.error
            for worker, result in enumerate(engine.pool.call("last_switch_report")):
                sizes = [geo.weight_bytes(s) if s else 0 for s in (shard_of(geo.cfg, p, worker)
                                                                   for p in (old, engine.placement))]
                check_log(result["in_place_log"], *sizes)
        got.finish(engine)
    assert [got[f"r{i}"] for i in range(len(prompts))] == reference
