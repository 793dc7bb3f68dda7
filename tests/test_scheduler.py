from rempd.engine.block_manager import BlockManager
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.scheduler import Scheduler
from rempd.engine.sequence import Sequence, SequenceStatus


def make_seq(name: str, prompt_len: int, arrival: float, max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=max_tokens),
                    seed=0, arrival=arrival)


def test_chunked_prefill_respects_token_budget_and_samples_only_at_the_end():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=6, max_model_len=64)
    seq = make_seq("a", 10, 0.0)
    sched.add(seq)
    batch = sched.schedule()
    assert batch.num_new_tokens == [6] and batch.samplers() == []
    step = sched.step_input(batch)
    assert step.positions == list(range(6)) and step.sample_indices == []
    assert sched.postprocess(batch, []) == []
    batch = sched.schedule()
    assert batch.num_new_tokens == [4] and batch.samplers() == [seq]
    assert sched.step_input(batch).sample_indices == [3]
    sched.postprocess(batch, [42])
    assert seq.output_token_ids == [42] and seq.num_computed == 10


def test_decode_and_prefill_share_a_step():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64)
    a, b = make_seq("a", 3, 0.0), make_seq("b", 20, 1.0)
    sched.add(a)
    sched.postprocess(sched.schedule(), [7])
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7]


def test_preemption_takes_the_youngest_and_recomputes_everything():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=16)
    old, young = make_seq("old", 8, 0.0), make_seq("young", 8, 1.0)
    sched.add(old)
    sched.add(young)
    sched.postprocess(sched.schedule(), [5, 6])  # both fill their 2 blocks; the pool is full
    batch = sched.schedule()  # old needs a third block: young is preempted
    assert batch.seqs == [old]
    assert young.status is SequenceStatus.WAITING and young.num_computed == 0 and young.block_table == []
    assert young.token_ids[-1] == 6 and sched.num_preempted == 1
    sched.postprocess(batch, [9])
    sched.finish(old, "abort")
    batch = sched.schedule()  # young returns and recomputes prompt + its generated token
    assert batch.seqs == [young] and batch.num_new_tokens == [9]


def test_in_flight_sequences_are_not_rescheduled_and_abort_waits_for_their_step():
    blocks = BlockManager(8, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32)
    seq = make_seq("a", 5, 0.0)
    sched.add(seq)
    batch = sched.schedule()
    assert sched.schedule() is None
    sched.finish(seq, "abort")
    assert blocks.num_free == 6  # still held by the running step
    assert sched.postprocess(batch, [3]) == []
    assert blocks.num_free == 8


def test_stop_conditions():
    sched = Scheduler(BlockManager(8, 4), 8, 64, max_model_len=32, eos_token_ids=(2,))
    eos, length = make_seq("eos", 3, 0.0), make_seq("len", 3, 1.0, max_tokens=1)
    ignore = Sequence("ign", [1, 1], SamplingParams(temperature=0, ignore_eos=True, stop_token_ids=[9]), 0, 2.0)
    for seq in (eos, length, ignore):
        sched.add(seq)
    sched.postprocess(sched.schedule(), [2, 5, 2])
    assert (eos.finish_reason, length.finish_reason, ignore.is_finished) == ("stop", "length", False)
    sched.postprocess(sched.schedule(), [9])
    assert ignore.finish_reason == "stop" and sched.blocks.num_free == 8


def test_micro_batches_share_the_running_sequences():
    """Under pp the engine caps each micro-batch, so a second one in flight has sequences to decode."""
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    seqs = [make_seq(name, 3, float(i)) for i, name in enumerate("abc")]
    for seq in seqs:
        sched.add(seq)
    sched.postprocess(sched.schedule(), [7, 7, 7])
    first, second = sched.schedule(max_seqs=2), sched.schedule(max_seqs=2)
    assert first.seqs == seqs[:2] and second.seqs == seqs[2:] and sched.schedule(max_seqs=2) is None


def test_run_ahead_under_micro_batches_is_fair_and_names_rows_across_steps():
    """pp = 4, async tokens: 5 steps in flight, every one run ahead once warm; each run-ahead token id names the
    sampled row of the step in flight that samples it (rows numbered across steps), and no micro-batch starves."""
    pp = 4
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=16, max_num_batched_tokens=64, max_model_len=512)
    sched.async_tokens = True
    seqs = [make_seq(f"s{i}", 3, float(i), max_tokens=400) for i in range(16)]
    for seq in seqs:
        sched.add(seq)
    in_flight, rows = [], {}  # rows: sampled row number → (sequence, the token it will get)
    for step_no in range(200):
        while len(in_flight) < pp + 1:
            batch = sched.schedule(-(-len(sched.running) // pp))
            step = sched.step_input(batch)
            for seq, token_id in zip(batch.seqs, step.token_ids):
                if token_id < 0:  # run ahead: the token its step in flight samples
                    assert rows[-token_id - 1][0] is seq
            for k, seq in enumerate(batch.samplers()):
                rows[step.first_sample + k] = (seq, 1000 + step.first_sample + k)
            in_flight.append((batch, step))
        batch, step = in_flight.pop(0)
        sched.postprocess(batch, [rows[step.first_sample + k][1] for k in range(len(step.samples))])
    assert all(any(t < 0 for t in step.token_ids) for _, step in in_flight)
    outputs = [seq.num_output_tokens for seq in seqs]
    assert max(outputs) - min(outputs) <= 1, outputs
