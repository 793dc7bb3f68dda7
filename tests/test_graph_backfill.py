"""Decode-graph buckets a switch's commit left out are captured while the engine is idle, smallest first, one per
idle turn (engine/graph_backfill.py). The pending set's rules with no processes; then a real AsyncEngine on CPU
workers through a stop-the-world and a staged switch with requests running: once idle, it went through exactly
the buckets the commit left out, and the tokens equal those of no switch (a staged switch given up before its cut
leaves nothing pending). CPU workers capture no graphs, so that check is of the engine's bookkeeping;
test_gpu_graphs.py checks the captures themselves."""
import asyncio
from types import SimpleNamespace

from backfill_run import serve, wait_backfilled
from rempd.engine.async_engine import AsyncEngine
from rempd.engine.config import EngineConfig
from rempd.engine.graph_backfill import GraphBackfill
from rempd.engine.graph_warmup import backfill_graph, batch_sizes, capture_graphs, capture_live_graphs
from rempd.engine.sampling_params import SamplingParams
from rempd.topology import Topology


def test_commit_leaves_out_every_bucket_but_the_live_ones_smallest_first():
    backfill = GraphBackfill()
    backfill.after_commit(64, [3, 3])  # two micro-batches of 3: the bucket of 4
    assert backfill.pending == [1, 2, 8, 16, 32, 64] and backfill.next_bucket() == 1
    backfill.after_commit(12, [12, 5])  # the largest bucket is max_num_seqs itself
    assert backfill.pending == [1, 2, 4] == backfill.left_out
    backfill.after_commit(8, [])  # nothing live: the commit captured nothing
    assert backfill.pending == [1, 2, 4, 8]


def test_pending_empties_as_captured_and_resets_on_commit_and_install():
    backfill = GraphBackfill()
    assert backfill.next_bucket() is None  # a new engine installs every bucket
    backfill.after_commit(8, [1])
    for expected in (2, 4):
        assert backfill.next_bucket() == expected
        backfill.captured(expected)
    assert backfill.pending == [8] and backfill.backfilled == 2 and backfill.left_out == [2, 4, 8]
    backfill.after_commit(8, [8])  # a later commit replaces what was pending
    assert backfill.pending == [1, 2, 4]
    backfill.after_install()
    assert backfill.pending == [] and backfill.next_bucket() is None and backfill.backfilled == 2


class RecordingPool:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def call(self, method: str, *args, workers=None):
        self.calls.append((method, *args))
        return [0.5] if method == "capture_graphs" else ["info"]


def cuda_engine(running: int, pp: int) -> SimpleNamespace:
    """What the graph helpers read of an LLMEngine on CUDA workers, its pool recording the calls."""
    config = SimpleNamespace(cuda_graphs=True, is_cpu=False, max_num_seqs=8)
    return SimpleNamespace(config=config, pool=RecordingPool(), active=[0, 1], graph_backfill=GraphBackfill(),
                           scheduler=SimpleNamespace(running=[None] * running),
                           placement=SimpleNamespace(topology=Topology(1, pp)))


def test_commit_install_and_backfill_call_the_workers():
    engine = cuda_engine(running=5, pp=1)
    capture_live_graphs(engine)
    assert engine.pool.calls == [("capture_graphs", 8, [5]), ("info",)]
    assert engine.graph_backfill.pending == [1, 2, 4]
    engine.pool.calls.clear()
    assert [backfill_graph(engine) for _ in range(4)] == [1, 2, 4, None]
    # one bucket a call, without the info refresh a request arriving meanwhile would wait for too
    assert engine.pool.calls == [("capture_graphs", 8, [1]), ("capture_graphs", 8, [2]), ("capture_graphs", 8, [4])]
    capture_live_graphs(engine)
    capture_graphs(engine)  # an install: every bucket, nothing left to backfill
    assert engine.graph_backfill.pending == [] and engine.graph_backfill.backfilled == 3


PROMPTS = [[(7 * i + j) % 200 + 3 for j in range(20 + 9 * i)] for i in range(4)]
PARAMS = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)


def test_idle_engine_backfills_what_a_live_switch_left_out(checkpoints):
    config = EngineConfig(str(checkpoints["tiny-llama"]), tp=2, pp=1, cpu_workers=2, max_model_len=256,
                          max_num_seqs=8)
    switches = [(Topology(1, 2), "stop_the_world"), (Topology(2, 1), "staged")]

    async def main():
        engine = await AsyncEngine.create(config)
        try:
            assert engine.status()["graphs_pending"] == []  # start-up installed every bucket
            reference, _ = await serve(engine, PROMPTS, PARAMS, "ref")
            runs = []
            for target, mode in switches:
                before = engine.engine.graph_backfill.backfilled
                tokens, report = await serve(engine, PROMPTS, PARAMS, mode, target, mode)
                await wait_backfilled(engine)
                status = engine.status()
                runs.append((tokens, report, list(engine.engine.graph_backfill.left_out),
                             status["graphs_backfilled"] - before, status["graphs_pending"]))
            # given up before its cut: the old stages serve on with their graphs, nothing becomes pending
            given_up = await serve(engine, PROMPTS, PARAMS, "given-up", Topology(1, 2), "staged", ("stage", "raise"))
            return reference, runs, given_up, engine.status()["graphs_pending"]
        finally:
            await engine.shutdown()

    reference, runs, (given_up, rolled_back), pending_after = asyncio.run(main())
    assert (rolled_back.state, rolled_back.mode) == ("rolled_back", "staged"), rolled_back
    assert given_up == reference and pending_after == []
    for (target, mode), (tokens, report, left_out, backfilled, pending) in zip(switches, runs):
        assert (report.state, report.mode, report.requests_live) == ("committed", mode, len(PROMPTS)), report
        assert tokens == reference
        # the commit captured the buckets of the live micro-batches; the idle engine went through all the others
        live = {next(b for b in (1, 2, 4, 8) if b >= n) for n in batch_sizes(len(PROMPTS), target.pp)}
        assert left_out == [b for b in (1, 2, 4, 8) if b not in live] and backfilled == len(left_out), left_out
        assert pending == []
