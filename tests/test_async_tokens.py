"""Async tokens (EngineConfig.async_tokens): at pp = 1 the driver sends each decode step before the previous step's
tokens reach it, and the workers feed those tokens back on the device. Outputs must be exactly those without it:
greedy and seeded, with stop strings, stop tokens, max_tokens, requests joining mid-run, an abort, TP2 and a live
switch through pp = 2 (where it is off) and back."""
import asyncio

import pytest

import fault_tools
from rempd import LLM, SamplingParams
from rempd.topology import Topology
from rempd.worker_pool.pool import WorkerError
from token_log import TokenLog

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 57)), [3] * 9, [40, 41], [12, 13, 14, 15, 16, 17]]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    # max_num_batched_tokens 16: the 37-token prompt takes three prefill chunks, decodes riding beside them
    # off unless a test turns it on: its outputs are the references the async runs must equal
    with LLM(checkpoints["tiny-llama"], tp=2, max_num_seqs=8, max_num_batched_tokens=16, async_tokens=False) as llm:
        yield llm


def set_async(llm: LLM, on: bool) -> None:
    assert not llm.engine.has_unfinished()
    llm.engine.config.async_tokens = on  # read by every _fill: one engine serves both runs


def spy_steps(llm: LLM, monkeypatch) -> list:
    """Every StepInput the driver sends (passed on unchanged)."""
    sent, send = [], llm.engine.pool.send_step

    def recording(step, workers):
        sent.append(step)
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


def test_mixed_batch_is_token_identical(llm, monkeypatch):
    full = llm.generate(PROMPTS, GREEDY)
    params = params_for(full)
    set_async(llm, False)
    reference = run_mixed(llm, params)
    set_async(llm, True)
    sent = spy_steps(llm, monkeypatch)
    try:
        fed = run_mixed(llm, params)
    finally:
        set_async(llm, False)
    ahead = [step for step in sent if min(step.token_ids) < 0]
    assert len(ahead) > len(sent) // 2  # most steps were sent before the previous step's tokens were in
    assert reference["r0"][2] == "stop" and reference["r2"][2] == "length" and len(reference["r2"][0]) == 3
    stop_at = full[5].token_ids.index(full[5].token_ids[5]) + 1
    assert reference["r5"][2] == "stop" and reference["r5"][0] == full[5].token_ids[:stop_at]
    for rid in ("r0", "r2", "r3", "r4", "r5"):
        assert fed[rid] == reference[rid], rid
    # r1 was aborted after six steps, with whatever it had by then: a prefix of its whole output
    assert fed["r1"][2] is None and fed["r1"][0] == full[1].token_ids[:len(fed["r1"][0])]


def test_eos_and_stop_token_drop_the_run_ahead_token(llm):
    """A sequence ended by a token whose successor was already computed ends exactly there."""
    full = llm.generate(PROMPTS[:2], GREEDY)
    stops = [SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[f.token_ids[k]])
             for f, k in zip(full, (2, 7))]
    set_async(llm, True)
    try:
        fed = llm.generate(PROMPTS[:2], stops)
    finally:
        set_async(llm, False)
    for f, out, k in zip(full, fed, (2, 7)):
        end = f.token_ids.index(f.token_ids[k]) + 1
        assert out.token_ids == f.token_ids[:end] and out.finish_reason == "stop"
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks


def test_live_switch_with_async_tokens(llm):
    """TP2 → TP1PP2 (async tokens off there) → TP2 mid-generation: quiesce drains the run-ahead step."""
    engine = llm.engine
    reference = llm.generate(PROMPTS[:4], GREEDY)
    set_async(llm, True)
    try:
        for i in range(4):
            engine.add_request(f"s{i}", PROMPTS[i], GREEDY)
        tokens = TokenLog()
        for target in [None, None, None, Topology(1, 2), None, None, None, Topology(2, 1)]:
            if target is None:
                tokens.add(engine.step())
                continue
            if engine.placement.topology.pp == 1:
                assert len(engine.in_flight) == 2  # one step run ahead of the other
            report = tokens.switch(engine, target)
            assert report.state == "committed" and not engine.in_flight
        tokens.finish(engine)
    finally:
        set_async(llm, False)
    assert [tokens[f"s{i}"] for i in range(4)] == [r.token_ids for r in reference]
    assert engine.placement.topology == Topology(2, 1)


def test_recovery_with_a_step_run_ahead(llm, monkeypatch):
    """A send that fails with a step run ahead in flight: recovery preempts everything, the sequences recompute,
    and the tokens are those of a run without either."""
    engine = llm.engine
    reference = llm.generate(PROMPTS[:3], GREEDY)
    set_async(llm, True)
    try:
        for i in range(3):
            engine.add_request(f"f{i}", PROMPTS[i], GREEDY)
        tokens = TokenLog()
        tokens.steps(engine, 4)
        assert len(engine.in_flight) == 2

        def broken(*args, **kwargs):
            raise WorkerError(0, "not reachable (test)")

        with monkeypatch.context() as patch:
            patch.setattr(engine.pool, "send_step", broken)
            tokens.add(engine.step())  # its tokens were in before the send of the next step failed
            with pytest.raises(WorkerError, match="not reachable"):
                engine.step()
        engine.recover("test")
        tokens.finish(engine)
    finally:
        set_async(llm, False)
    assert [tokens[f"f{i}"] for i in range(3)] == [r.token_ids for r in reference]
    blocks = engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks


def test_preemption_with_async_tokens(checkpoints, llm):
    """12 blocks of 16 tokens cannot hold 6 sequences of up to 50 tokens: run-ahead rows wait for blocks instead
    of preempting, and the sequences preempted by recompute still produce the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [p[:20] for p in PROMPTS]
    reference = [o.token_ids for o in llm.generate(prompts, params)]
    bytes_per_block = 4 * 2 * 16 * 1 * 16 * 4  # layers, K and V, block size, kv heads per rank at TP2, head dim, fp32
    with LLM(checkpoints["tiny-llama"], tp=2, kv_cache_memory=12 * bytes_per_block, block_size=16,
             max_model_len=64, async_tokens=True) as small:
        assert small.engine.scheduler.blocks.num_blocks == 12
        assert [o.token_ids for o in small.generate(prompts, params)] == reference
        assert small.engine.stats().num_preempted > 0
        blocks = small.engine.scheduler.blocks
        assert blocks.num_free == blocks.num_blocks


def test_daemon_streams_through_live_switches_with_async_tokens(checkpoints, llm, start_daemon):
    """`rempd serve --async-tokens` (the default), streamed through the official client across TP2 → TP1PP2 → TP2: the texts of
    an engine without async tokens and without a switch."""
    prompts = [f"Stream {i} says: " + "lorem ipsum dolor " * (i + 1) for i in range(4)]
    reference = [o.text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))]
    daemon = start_daemon(checkpoints["tiny-llama"], tp=2, workers=2, extra=["--async-tokens"])
    targets = [{"tp": 1, "pp": 2, "mode": "stop_the_world"}, {"tp": 2, "pp": 1, "mode": "stop_the_world"}]
    texts, reports = asyncio.run(fault_tools.stream_through_switches(daemon, targets, prompts, 60))
    assert all(report["state"] == "committed" for report in reports), reports
    assert texts == reference
