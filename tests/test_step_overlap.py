"""The driver sends a step's successor before it makes the step's outputs (LLMEngine.finish_oldest): the outputs
stay exact when a request ends on a stop string with a step of it still in flight, and a failed send is raised
only after the tokens already computed have reached their requests."""
import pytest

from rempd import LLM, SamplingParams
from rempd.worker_pool.pool import WorkerError

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    # the driver's own overlap (next step sent before outputs are made), without async tokens' run-ahead
    with LLM(checkpoints["tiny-llama"], cpu_workers=1, max_num_seqs=4, async_tokens=False) as llm:
        yield llm


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.in_flight
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks


def test_next_step_is_in_flight_while_outputs_are_made(llm):
    engine = llm.engine
    for i, ids in enumerate(PROMPTS):
        engine.add_request(f"overlap-{i}", ids, GREEDY)
    engine.step_log.clear()
    while engine.has_unfinished():
        outputs = engine.step()
        if outputs and not outputs[0].finished:
            assert len(engine.in_flight) == 1  # sent before these outputs were made
    rows = engine.step_log.to_dicts()
    assert len(rows) == GREEDY.max_tokens
    assert all(later["sent"] <= row["done"] for row, later in zip(rows, rows[1:]))
    assert_idle(llm)


def test_stop_string_with_the_next_step_in_flight(llm):
    full = llm.generate(PROMPTS, GREEDY)
    text = full[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].isprintable())
    stopped = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                                     GREEDY])
    assert stopped[0].text == text[:text.find(stop)] and stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids == full[0].token_ids[:len(stopped[0].token_ids)]
    assert stopped[1].token_ids == full[1].token_ids  # its neighbour is untouched by the wasted step
    assert_idle(llm)


def test_failed_send_is_raised_after_the_tokens_reach_their_requests(llm, monkeypatch):
    reference = llm.generate(PROMPTS, GREEDY)
    engine = llm.engine
    for i, ids in enumerate(PROMPTS):
        engine.add_request(f"fail-{i}", ids, GREEDY)
    tokens = {f"fail-{i}": [] for i in range(len(PROMPTS))}
    for out in engine.step() + engine.step():  # the prefill, then a decode
        tokens[out.request_id] += out.new_token_ids

    def broken(*args, **kwargs):
        raise WorkerError(0, "not reachable (test)")

    monkeypatch.setattr(engine.pool, "send_step", broken)
    delivered = engine.step()  # its tokens were in before the send of the next step failed
    assert sorted(out.request_id for out in delivered) == sorted(tokens)
    for out in delivered:
        tokens[out.request_id] += out.new_token_ids
    with pytest.raises(WorkerError, match="not reachable"):
        engine.step()
    engine.recover("test")  # a fresh pool: the requests recompute their KV and go on
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert [tokens[f"fail-{i}"] for i in range(len(PROMPTS))] == [r.token_ids for r in reference]
    assert_idle(llm)


def test_a_quiesce_cut_short_by_a_worker_failure_keeps_the_outputs_it_made(checkpoints, monkeypatch):
    """quiesce finishes every batch in flight (one run ahead with async tokens): when the second batch's collect
    fails, the first one's outputs, each carrying its token's text once, are handed out after recovery, not lost
    with the exception."""
    with LLM(checkpoints["tiny-llama"], cpu_workers=1, max_num_seqs=4, async_tokens=True) as llm:
        reference = llm.generate(PROMPTS, GREEDY)
        engine = llm.engine
        for i, ids in enumerate(PROMPTS):
            engine.add_request(f"cut-{i}", ids, GREEDY)
        tokens = {f"cut-{i}": [] for i in range(len(PROMPTS))}
        while len(engine.in_flight) < 2:
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        collect, calls = engine.pool.collect, []

        def fails_second(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:
                raise WorkerError(0, "died while replying (test)")
            return collect(*args, **kwargs)

        monkeypatch.setattr(engine.pool, "collect", fails_second)
        with pytest.raises(WorkerError, match="died"):
            engine.quiesce()
        assert sorted(out.request_id for out in engine.made) == sorted(tokens)
        monkeypatch.setattr(engine.pool, "collect", collect)
        engine.recover("test")
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
    assert [tokens[f"cut-{i}"] for i in range(len(PROMPTS))] == [r.token_ids for r in reference]
