"""A staged switch whose target does not fit beside the serving topology gives free KV blocks of the old pool
back (never the live ones), stages, and commits with the tokens of no switch; given up, it takes them again. Two
CPU workers under a memory budget (REMP_CPU_DEVICE_BYTES) that counts the pool, as a GPU does."""
import pytest

from rempd.engine.config import EngineConfig
from rempd.engine.llm_engine import LLMEngine
from rempd.topology import Topology
from rempd.worker_pool.device_memory import CPU_DEVICE_BYTES_ENV
from test_staged_overlap import serve

POOL_BYTES = 64 << 20  # EngineConfig.kv_cache_memory: each worker's pool
# tiny-llama in float32 holds about 428 KB a worker at TP1PP2 and at TP2PP1: this leaves about 270 KB to stage in
# beside the pool, where the new shard alone needs 428 KB
BUDGET = POOL_BYTES + 700_000


@pytest.fixture
def engine(checkpoints, monkeypatch):
    monkeypatch.setenv(CPU_DEVICE_BYTES_ENV, str(BUDGET))  # the workers read it
    engine = LLMEngine(EngineConfig(str(checkpoints["tiny-llama"]), tp=1, pp=2, cpu_workers=2, max_model_len=256,
                                    kv_cache_memory=POOL_BYTES))
    yield engine
    engine.close()


def pool_blocks(engine: LLMEngine) -> set[int]:
    return {info["kv_blocks"] for info in engine.pool.call("info", workers=engine.active)}


def test_free_blocks_are_given_back_so_that_the_target_stages(engine):
    reference, _, _ = serve(engine, "ref")
    before = engine.scheduler.blocks.num_blocks
    switched, report, _ = serve(engine, "sw", Topology(2, 1))
    assert (report.state, report.mode, report.mode_reason) == ("committed", "staged", None), report
    assert switched == reference
    given = report.kv_blocks_given_back
    assert 0 < given < before // 10, given  # what the shortfall asks, not the pool
    assert report.phases["give_back"] > 0 and "give_back_graph_capture" in report.transform_detail
    assert report.serving_pause_s > report.give_back_pause_s >= report.phases["give_back"], report
    assert report.kv_blocks_migrated > 0 and report.requests_preempted == 0


def test_a_switch_given_up_after_giving_back_takes_the_blocks_again(engine):
    reference, _, _ = serve(engine, "ref")
    before = engine.scheduler.blocks.num_blocks
    switched, report, _ = serve(engine, "sw", Topology(2, 1), fault=("groups", "raise"))
    assert (report.state, report.mode) == ("rolled_back", "staged"), report
    assert report.kv_blocks_given_back > 0
    assert switched == reference
    assert engine.placement.topology == Topology(1, 2)
    assert engine.scheduler.blocks.num_blocks == before and pool_blocks(engine) == {before}
    assert engine.scheduler.blocks.num_free == before  # every request finished: no block leaked
