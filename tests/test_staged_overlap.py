"""A staged switch driven as the engine thread drives it, on 2 CPU workers: staging work is posted between steps
without draining the steps in flight (but for the groups' gap), its chunk transfers stay in flight across serving
steps, and the tokens equal those of no switch."""
from rempd.engine.config import EngineConfig
from rempd.engine.llm_engine import LLMEngine
from rempd.engine.sampling_params import SamplingParams
from rempd.migrate.report import SwitchReport
from rempd.migrate.staging import StagedSwitch, StagingOptions
from rempd.topology import Topology

PROMPTS = [[(7 * i + j) % 200 + 3 for j in range(20 + 9 * i)] for i in range(4)]
PARAMS = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)


def serve(engine: LLMEngine, tag: str, target: Topology | None = None,
          options: StagingOptions = StagingOptions(chunk_bytes=16 << 10, chunks_per_gap=2), fault=None):
    """Greedy tokens per prompt; with a target, a staged switch to it begins after a few steps. Returns the tokens,
    the switch's report and, per staging gap but the cut, the steps in flight before and after it."""
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", prompt, PARAMS)

    def take(outputs) -> None:
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(6):
        take(engine.step())
    staged, in_flight = None, []
    if target is not None:
        take(engine.quiesce())  # the engine thread's commands run with no step in flight
        report = SwitchReport(id="overlap", source=str(engine.placement), target=str(target))
        staged = StagedSwitch(engine, target, report, engine.links, options, fault, emit=take)
        take(staged.begin())
    while engine.has_unfinished():
        if staged is not None and not staged.finished:  # as AsyncEngine._run: advance, then step
            before = len(engine.in_flight)
            take(staged.advance())
            if not staged.finished:
                in_flight.append((before, len(engine.in_flight)))
        take(engine.step())
    return [tokens[f"{tag}{i}"] for i in range(len(PROMPTS))], staged.report if staged else None, in_flight


def test_staging_transfers_overlap_serving_steps_and_tokens_stay_identical(checkpoints):
    engine = LLMEngine(EngineConfig(str(checkpoints["tiny-llama"]), tp=1, pp=2, cpu_workers=2, max_model_len=256))
    try:
        reference, _, _ = serve(engine, "ref")
        switched, report, in_flight = serve(engine, "sw", Topology(2, 1))
    finally:
        engine.close()
    assert (report.state, report.mode, report.mode_reason) == ("committed", "staged", None), report
    assert switched == reference
    assert report.kv_blocks_precopied > 0 and report.kv_blocks_delta < report.kv_blocks_migrated, report
    detail = report.transform_detail
    # weights and KV moved in chunks, each left in flight while the workers ran serving steps
    assert detail["staging_weights"] > 0 and detail["staging_precopy"] > 0, detail
    assert detail["staging_overlapped_steps"] > 0, detail
    # what locates a stall while staging: the background loads' time, the longest wait for a step's reply and
    # the longest gap between two replies, each within the switch
    for key in ("staging_loads", "staging_longest_step_wait", "staging_longest_reply_gap"):
        assert 0 < detail[key] < report.total_seconds, (key, detail)
    # and, of the slowest worker's loads, each kind's time and bytes: half of its TP1PP2 layers stay (the rest
    # comes from its peer), and a CPU worker's store is not page-locked
    assert detail["staging_loads_stay_bytes"] > 0
    assert 0 < detail["staging_loads_stay_seconds"] <= detail["staging_loads"], detail
    assert detail["staging_loads_pinned"] == 0, detail
    # only the groups' gap drained the pipeline's micro-batches in flight (their collectives share the world
    # group's links with the steps); after every other gap the engine went back to stepping with them
    drained = [(before, after) for before, after in in_flight if after != before]
    assert len(drained) == 1 and drained[0][1] == 0, in_flight
    assert sum(before > 0 for before, _ in in_flight) > 3, in_flight
