"""Hypothesis state machines over the pure logic: the block manager, the scheduler with preemption and pp
micro-batches in flight, and chains of switch plans (the data each worker holds is simulated through every
plan's moves, so a chain that loses or misplaces a KV head or a weight row fails)."""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from rempd.engine.block_manager import BlockManager
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.scheduler import Scheduler
from rempd.engine.sequence import Sequence, SequenceStatus
from rempd.migrate.plan import plan_switch
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.model.config import ModelConfig
from rempd.model.make_checkpoint import shape_config
from rempd.topology import Placement, Topology, all_placements, valid_topologies

MACHINE = settings(max_examples=150, stateful_step_count=40, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


class BlockManagerMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.blocks = BlockManager(num_blocks=12, block_size=4)
        self.live: list[Sequence] = []

    @rule(target=seqs, tokens=st.integers(1, 30))
    def new(self, tokens):
        seq = Sequence(f"s{len(self.live)}", [1] * tokens, SamplingParams(), seed=0)
        self.live.append(seq)
        return seq

    @rule(seq=seqs, tokens=st.integers(1, 60))
    def grow(self, seq, tokens):
        if self.blocks.can_hold(seq, tokens):
            before = list(seq.block_table)
            self.blocks.grow(seq, tokens)
            assert seq.block_table[:len(before)] == before  # existing blocks never move
            assert len(seq.block_table) >= self.blocks.blocks_for(tokens)
        else:
            free = self.blocks.num_free
            try:
                self.blocks.grow(seq, tokens)
                raise AssertionError("grow past the free blocks succeeded")
            except RuntimeError:
                assert self.blocks.num_free == free  # a refused grow takes nothing

    @rule(seq=seqs)
    def release(self, seq):
        self.blocks.release(seq)
        assert seq.block_table == []

    @invariant()
    def every_block_is_free_or_owned_once(self):
        owned = [b for s in self.live for b in s.block_table]
        assert sorted(owned + list(self.blocks.free_blocks)) == list(range(self.blocks.num_blocks))


class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, abort and finish while up to `pp` steps are in flight and the pool is small enough
    to force preemption. The stand-in model's token at each output position depends only on (request,
    position), as the real sampler's does on (seed, index): so a recomputed request must end with exactly the
    tokens it would have had without preemption."""

    def __init__(self):
        super().__init__()
        self.pp = 2  # two micro-batches in flight, as at PP2
        self.scheduler = Scheduler(BlockManager(num_blocks=10, block_size=4), max_num_seqs=6,
                                   max_num_batched_tokens=16, max_model_len=40)
        self.in_flight = []
        self.all: list[Sequence] = []
        self.clock = 0.0

    @staticmethod
    def token(seq: Sequence) -> int:
        return (hash(seq.request_id) + 7 * seq.num_output_tokens) % 1000 + 2

    @rule(prompt=st.integers(1, 20), max_tokens=st.integers(1, 16))
    def add(self, prompt, max_tokens):
        self.clock += 1
        seq = Sequence(f"r{len(self.all)}", [5] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       seed=len(self.all), arrival=self.clock)
        self.all.append(seq)
        self.scheduler.add(seq)

    @precondition(lambda self: len(self.in_flight) < self.pp)
    @rule()
    def schedule(self):
        batch = self.scheduler.schedule()
        if batch is None:
            return
        step = self.scheduler.step_input(batch)
        slots = set(step.slot_mapping)
        assert len(slots) == len(step.slot_mapping), "two tokens of one step write one KV slot"
        for seq, n, table in zip(batch.seqs, batch.num_new_tokens, step.block_tables):
            assert n > 0 and seq.status is SequenceStatus.RUNNING
            assert set(table) <= set(seq.block_table)
        tables = [set(s.block_table) for s in batch.seqs]
        assert sum(map(len, tables)) == len(set().union(*tables)), "two sequences share a block"
        self.in_flight.append(batch)

    @precondition(lambda self: self.in_flight)
    @rule()
    def finish_oldest(self):
        batch = self.in_flight.pop(0)
        tokens = [self.token(s) for s in batch.samplers()]
        self.scheduler.postprocess(batch, tokens)

    @precondition(lambda self: self.all)
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(self.all))
        self.scheduler.finish(seq, "abort")

    @invariant()
    def blocks_are_conserved(self):
        owned = [b for s in self.all for b in s.block_table]
        blocks = self.scheduler.blocks
        assert sorted(owned + list(blocks.free_blocks)) == list(range(blocks.num_blocks))

    @invariant()
    def waiting_requests_hold_no_kv(self):
        for seq in self.scheduler.waiting:
            assert seq.status is SequenceStatus.WAITING and seq.num_computed == 0
            assert not seq.block_table

    def teardown(self):
        # drain: everything not aborted must finish with exactly the tokens it would have had alone
        for _ in range(2000):
            if not (self.scheduler.has_work or self.in_flight):
                break
            if len(self.in_flight) < self.pp:
                self.schedule()
            if self.in_flight:
                self.finish_oldest()
        assert not self.scheduler.has_work and not self.in_flight, "requests left that never finish"
        for seq in self.all:
            if seq.finish_reason == "abort":
                continue
            assert seq.finish_reason == "length"
            expected = Sequence(seq.request_id, seq.prompt_token_ids, seq.params, seq.seed)
            while expected.num_output_tokens < seq.params.max_tokens:
                expected.token_ids.append(self.token(expected))
            assert seq.output_token_ids == expected.output_token_ids
        assert self.scheduler.blocks.num_free == self.scheduler.blocks.num_blocks


class SwitchPlanMachine(RuleBasedStateMachine):
    """Random chains of switches (any valid topology, any placement) with live KV; every worker's weight rows
    and KV (layer, head) cells are followed through each plan's pieces."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig.from_dict(shape_config("llama3-1b"))  # 8 KV heads, 16 layers: uneven splits
        self.geo = ModelGeometry(self.cfg, "bfloat16")
        self.devices = 4
        self.placement = Placement.default(Topology(1, 1))
        self.kv = {0: self.required_kv(self.placement, 0)}
        self.weights = {0: self.geo.holdings(shard_of(self.cfg, self.placement, 0))}

    def required_kv(self, placement, worker) -> set:
        shard = shard_of(self.cfg, placement, worker)
        return {(layer, head) for layer in shard.layers for head in self.geo.kv_heads(shard)}

    @rule(data=st.data(), live_blocks=st.integers(0, 64))
    def switch(self, data, live_blocks):
        topology = data.draw(st.sampled_from(valid_topologies(self.devices, self.cfg.num_heads,
                                                              self.cfg.num_kv_heads, self.cfg.num_layers)))
        target = data.draw(st.one_of(st.just(topology), st.sampled_from(all_placements(topology, self.devices))))
        plan = plan_switch(self.geo, self.placement, target, self.devices, live_blocks, 16)
        new = plan.new
        assert new.topology == topology and len(set(new.workers)) == topology.size
        kv: dict[int, set] = {w: set() for w in new.workers}
        for piece in plan.kv:
            cells = {(layer, head) for layer in piece.layers for head in piece.heads}
            assert cells <= self.kv.get(piece.src, set()), f"{piece} reads KV its source does not hold"
            kv[piece.dst] |= cells
        for worker in new.workers:
            assert kv[worker] == self.required_kv(new, worker), f"worker {worker} misses KV after the switch"
        weights: dict[int, dict[str, list]] = {w: {} for w in new.workers}
        for piece in plan.weights:
            if piece.src is not None:
                start, stop = self.weights[piece.src][piece.name]
                assert start <= piece.start and piece.stop <= stop, f"{piece} reads rows its source lacks"
            weights[piece.dst].setdefault(piece.name, []).append((piece.start, piece.stop))
        for worker in new.workers:
            need = self.geo.holdings(shard_of(self.cfg, new, worker))
            assert set(weights[worker]) == set(need), f"worker {worker} tensors differ"
            for name, (start, stop) in need.items():
                runs = sorted(weights[worker][name])
                assert runs[0][0] == start and runs[-1][1] == stop and all(
                    a[1] == b[0] for a, b in zip(runs, runs[1:])), f"{name} rows on worker {worker}: {runs}"
        self.placement = new
        self.kv = kv
        self.weights = {w: self.geo.holdings(shard_of(self.cfg, new, w)) for w in new.workers}


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = MACHINE
TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = MACHINE
TestSwitchPlans = SwitchPlanMachine.TestCase
TestSwitchPlans.settings = settings(MACHINE, max_examples=30, stateful_step_count=12)


def test_a_switch_report_and_the_step_log_can_be_read_while_the_engine_thread_writes_them():
    """The API serializes a report, and reads the step log for /v1/status, while the engine thread writes both."""
    import sys
    import threading

    from rempd.engine.step_log import StepLog
    from rempd.migrate.report import SwitchReport

    report, log, stop = SwitchReport(id="s", source="a", target="b"), StepLog(("sent", "replied")), threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            report.transform_detail[f"k{i % 64}"] = float(i)
            if i % 64 == 0:
                report.transform_detail.clear()
            log.add(float(i), float(i) + 1)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a thread switch at nearly every bytecode: a race shows within these reads
    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(2000):
            assert report.to_dict()["id"] == "s"
            assert log.median_ms(("sent", "replied")) == 1000.0
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(before)
