"""Async tokens (EngineConfig.async_tokens): the driver sends each decode step before the previous step's tokens
reach it, and the workers feed those tokens back on the device. Outputs must be exactly those without it: greedy
and seeded, with stop strings, stop tokens, max_tokens, requests joining mid-run, an abort, TP2 and a live switch
through pp = 2 and back (pp > 1 on four workers: test_async_tokens_pp.py)."""
import pytest

from async_runs import (GREEDY, PROMPTS, assert_preemption_keeps_tokens, assert_same_outputs, params_for, run_mixed,
                        set_async, spy_steps)
from rempd import LLM, SamplingParams
from rempd.topology import Topology
from rempd.worker_pool.pool import WorkerError
from token_log import TokenLog


@pytest.fixture(scope="module")
def llm(checkpoints):
    # max_num_batched_tokens 16: the 37-token prompt takes three prefill chunks, decodes riding beside them
    # off unless a test turns it on: its outputs are the references the async runs must equal
    with LLM(checkpoints["tiny-llama"], tp=2, max_num_seqs=8, max_num_batched_tokens=16, async_tokens=False) as llm:
        yield llm


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
    assert_same_outputs(full, reference, fed)


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
    """TP2 → TP1PP2 → TP2 mid-generation: quiesce drains the run-ahead step, and at pp = 2 the tokens in flight
    between the stages."""
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
            # a micro-batch per stage, and one step run ahead
            assert len(engine.in_flight) == engine.placement.topology.pp + 1
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
    bytes_per_block = 4 * 2 * 16 * 1 * 16 * 4  # layers, K and V, block size, kv heads per rank at TP2, head dim, fp32
    assert_preemption_keeps_tokens(checkpoints["tiny-llama"], llm, bytes_per_block, tp=2)
