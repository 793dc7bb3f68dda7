"""Shared by the async-token tests: prompts, one of each way a request ends, and a run with requests joining
and one aborted mid-run, whose outputs with async tokens must equal those without."""
from rempd import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 57)), [3] * 9, [40, 41], [12, 13, 14, 15, 16, 17]]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


def set_async(llm: LLM, on: bool) -> None:
    assert not llm.engine.has_unfinished()
    llm.engine.config.async_tokens = on  # read by every _fill: one engine serves both runs


def spy_steps(llm: LLM, monkeypatch, depths: list[int] | None = None) -> list:
    """Every StepInput the driver sends (passed on unchanged); `depths` gets the steps in flight with each."""
    sent, send = [], llm.engine.pool.send_step

    def recording(step, workers):
        sent.append(step)
        if depths is not None:
            depths.append(len(llm.engine.in_flight) + 1)
        return send(step, workers)

    monkeypatch.setattr(llm.engine.pool, "send_step", recording)
    return sent


def params_for(full: list) -> list[SamplingParams]:
    """One of each way to end, from the greedy outputs `full`: stop string, plain (aborted), max_tokens, seeded
    sampling (top-k/top-p, and a single token), a stop token (as EOS would)."""
    text = full[0].text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 1) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    return [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[stop]),
            GREEDY,
            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=11, max_tokens=1, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[full[5].token_ids[5]])]


def run_mixed(llm: LLM, params: list[SamplingParams]) -> dict[str, tuple]:
    """Two requests at the start, three joining after two steps, one more after four; the sixth is aborted
    after six steps. Returns id → (tokens, text, finish reason)."""
    engine = llm.engine
    got: dict[str, list] = {}
    joins = {0: [0, 1], 2: [2, 3, 4], 4: [5]}
    steps = 0
    while steps == 0 or engine.has_unfinished() or steps <= max(joins):
        for i in joins.get(steps, []):
            engine.add_request(f"r{i}", PROMPTS[i], params[i])
            got[f"r{i}"] = [[], "", None]
        if steps == 6:
            engine.abort_request("r1")
        for out in engine.step():
            got[out.request_id][0] += out.new_token_ids
            got[out.request_id][1] += out.new_text
            got[out.request_id][2] = out.finish_reason
        steps += 1
    blocks = engine.scheduler.blocks
    assert not engine.in_flight and blocks.num_free == blocks.num_blocks  # the run-ahead steps' blocks came back
    return {k: tuple(v) for k, v in got.items()}


def assert_same_outputs(full: list, reference: dict[str, tuple], fed: dict[str, tuple]) -> None:
    """run_mixed's outputs with async tokens (`fed`) are those without (`reference`); `full`: params_for's."""
    assert reference["r0"][2] == "stop" and reference["r2"][2] == "length" and len(reference["r2"][0]) == 3
    stop_at = full[5].token_ids.index(full[5].token_ids[5]) + 1
    assert reference["r5"][2] == "stop" and reference["r5"][0] == full[5].token_ids[:stop_at]
    for rid in ("r0", "r2", "r3", "r4", "r5"):
        assert fed[rid] == reference[rid], rid
    # r1 was aborted after six steps, with whatever it had by then: a prefix of its whole output
    assert fed["r1"][2] is None and fed["r1"][0] == full[1].token_ids[:len(fed["r1"][0])]


def assert_preemption_keeps_tokens(checkpoint: str, reference: LLM, bytes_per_block: int, **topology: int) -> None:
    """12 blocks of 16 tokens cannot hold 6 sequences of up to 50 tokens: with async tokens, run-ahead rows wait
    for blocks instead of preempting, and the sequences preempted by recompute still produce `reference`'s tokens
    (an engine without async tokens). bytes_per_block: one block of one worker of `topology`."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [p[:20] for p in PROMPTS]
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    with LLM(checkpoint, kv_cache_memory=12 * bytes_per_block, block_size=16, max_model_len=64, async_tokens=True,
             **topology) as small:
        assert small.engine.scheduler.blocks.num_blocks == 12
        assert [o.token_ids for o in small.generate(prompts, params)] == expected
        assert small.engine.stats().num_preempted > 0
        blocks = small.engine.scheduler.blocks
        assert blocks.num_free == blocks.num_blocks
