"""Async tokens at pp > 1 on four gloo workers: the last stage hands each step's sampled tokens to the first stage,
so the driver keeps pp + 1 micro-batches in flight without the host between them. Outputs equal those without
async tokens at TP2PP2, TP1PP4 and TP1PP2 (greedy, seeded, stop strings, stop tokens, max_tokens, an abort), with
EOS-like stops dropping the token run ahead, through live switches between pp > 1 topologies (engine and daemon
under streaming load), and with a KV pool small enough to preempt."""
import asyncio

import pytest

import fault_tools
from async_runs import (GREEDY, PROMPTS, assert_preemption_keeps_tokens, assert_same_outputs, params_for, run_mixed,
                        set_async, spy_steps)
from rempd import LLM, SamplingParams
from rempd.topology import Topology
from token_log import TokenLog


@pytest.fixture(scope="module")
def llm4(checkpoints):
    # as test_async_tokens.py's engine (three prefill chunks for the 37-token prompt), on four workers
    with LLM(checkpoints["tiny-llama"], tp=2, pp=2, max_num_seqs=8, max_num_batched_tokens=16,
             async_tokens=False) as llm:
        yield llm


def move_to(llm: LLM, topology: Topology) -> None:
    if llm.engine.placement.topology != topology:
        assert TokenLog().switch(llm.engine, topology).state == "committed"


@pytest.mark.parametrize("tp, pp", [(2, 2), (1, 4), (1, 2)])
def test_outputs_equal_those_without(llm4, monkeypatch, tp, pp):
    move_to(llm4, Topology(tp, pp))
    full = llm4.generate(PROMPTS, GREEDY)
    params = params_for(full)
    reference = run_mixed(llm4, params)
    stops = [SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[f.token_ids[k]])
             for f, k in zip(full, (2, 7))]
    set_async(llm4, True)
    depths: list[int] = []
    sent = spy_steps(llm4, monkeypatch, depths)
    try:
        fed = run_mixed(llm4, params)
        stopped = llm4.generate(PROMPTS[:2], stops)  # ended by a token whose successor was already sent
    finally:
        set_async(llm4, False)
    assert_same_outputs(full, reference, fed)
    for f, out, k in zip(full, stopped, (2, 7)):
        end = f.token_ids.index(f.token_ids[k]) + 1
        assert out.token_ids == f.token_ids[:end] and out.finish_reason == "stop"
    ahead = [step for step in sent if min(step.token_ids) < 0]
    assert len(ahead) > len(sent) // 4, (len(ahead), len(sent))
    assert max(depths) == pp + 1  # a micro-batch per stage, and one more run ahead
    blocks = llm4.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks


def test_live_switches_between_pp_topologies(llm4):
    """TP2PP2 → TP1PP4 → TP1PP2 → TP2PP2 mid-generation with steps run ahead: quiesce drains them and the tokens
    on their way between the stages."""
    engine = llm4.engine
    move_to(llm4, Topology(2, 2))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    reference = [o.token_ids for o in llm4.generate(PROMPTS[:4], params)]
    set_async(llm4, True)
    try:
        for i in range(4):
            engine.add_request(f"s{i}", PROMPTS[i], params)
        tokens = TokenLog()
        for target in (Topology(1, 4), Topology(1, 2), Topology(2, 2)):
            tokens.steps(engine, 4)
            assert len(engine.in_flight) == engine.placement.topology.pp + 1
            report = tokens.switch(engine, target)
            assert report.state == "committed" and report.requests_live == 4 and not engine.in_flight
        tokens.finish(engine)
    finally:
        set_async(llm4, False)
    assert [tokens[f"s{i}"] for i in range(4)] == reference


def test_preemption_at_pp2(checkpoints, llm4):
    bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers per stage, K and V, block size, kv heads, head dim, fp32
    assert_preemption_keeps_tokens(checkpoints["tiny-llama"], llm4, bytes_per_block, pp=2)


def test_daemon_streams_through_live_switches_with_async_tokens(llm4, start_daemon, checkpoints):
    """`rempd serve --async-tokens` (the default), streamed through the official client across TP2PP2 → TP1PP4 →
    TP2PP1: the texts of an engine without async tokens and without a switch."""
    prompts = [f"Stream {i} says: " + "lorem ipsum dolor " * (i + 1) for i in range(4)]
    reference = [o.text for o in llm4.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))]
    daemon = start_daemon(checkpoints["tiny-llama"], tp=2, pp=2, workers=4, extra=["--async-tokens"])
    targets = [{"tp": 1, "pp": 4, "mode": "stop_the_world"}, {"tp": 2, "pp": 1, "mode": "stop_the_world"}]
    texts, reports = asyncio.run(fault_tools.stream_through_switches(daemon, targets, prompts, 60))
    assert all(report["state"] == "committed" for report in reports), reports
    assert texts == reference
