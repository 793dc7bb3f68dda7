"""A staged switch: the target's groups and shards are built, and live KV pre-copied, between the steps of the
old topology, which keeps serving; the cut then quiesces, sends only the KV written since (the delta) and
commits. When the workers have no memory to stage in, it runs the stop-the-world transaction and says why."""
from __future__ import annotations

import logging
import time
from typing import Callable

from rempd.engine.graph_warmup import expected_batch_sizes
from rempd.engine.kv_resize import GivenBack
from rempd.migrate.capacity import BudgetQuery, SwitchRefused, ask_budget, conclude_capacity
from rempd.migrate.delta import PrecopyLedger
from rempd.migrate.phase_clock import Fault, PhaseClock
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.predict import LinkSpeeds
from rempd.migrate.report import SwitchReport
from rempd.migrate.staging_budget import GiveBack, StagingBudget, StagingOptions
from rempd.migrate.staged_cut import StagedCut
from rempd.migrate.staging_tasks import StagingTasks
from rempd.migrate.transaction import SwitchTransaction, make_plan, tp_member_sets
from rempd.topology import Placement, Topology
from rempd.worker_pool.pool import WorkerError
from rempd.worker_pool.ticket import Ticket

log = logging.getLogger("rempd.switch")
FAULT_PHASES = {"transform": "delta"}  # a fault aimed at stop-the-world's transform hits the staged delta
MAX_PRECOPY_ROUNDS = 64  # the cut comes after this many KV chunks even if decoding outruns the pre-copy


class StagedSwitch:
    def __init__(self, engine, target: Topology | Placement, report: SwitchReport, links: LinkSpeeds,
                 options: StagingOptions, fault: Fault | None = None, emit: Callable[[list], None] | None = None):
        self.engine, self.target, self.report, self.links = engine, target, report, links
        self.emit = emit  # hands the tokens of the steps the cut finishes to their streams before the cut's work
        self.requested_fault = fault
        # phases are the engine thread's seconds in them: staging ones add up across the gaps between steps
        self.clock = PhaseClock(engine, report, (FAULT_PHASES.get(fault[0], fault[0]), fault[1]) if fault else None)
        self.is_cuda = engine.devices[0].startswith("cuda")
        self.budget = StagingBudget(engine, options, self.is_cuda)
        self.ledger = PrecopyLedger(engine.config.block_size)
        self.tasks: StagingTasks | None = None
        self.plan: SwitchPlan | None = None
        self.old = engine.placement
        self.capacity = 0
        self.precopy_rounds = 0
        self.pool_blocks = 0  # blocks of the target's shape that every new worker's old pool memory holds
        self.given_back = GivenBack()
        self.query: BudgetQuery | None = None
        self.room_ticket: Ticket | None = None  # the new workers' free memory, asked with the budget
        self.ticket: Ticket | None = None  # the question or staging work posted last, with its kind
        self.ticket_kind = ""
        self.loaded = False  # every worker's host-store loads are in
        self.cut: StagedCut | None = None
        self.finished = False
        self.begun = time.perf_counter()

    @property
    def involved(self) -> list[int]:
        return sorted(set(self.old.workers) | set(self.plan.new.workers))

    def begin(self) -> list:
        """Plan and ask the workers what the target costs them; their answer is read between later steps
        (advance), so that planning holds no serving step (the plan phase took 32-56 ms of the engine thread on
        4x H100, 7B, when it waited for the answer). A target that cannot run is refused here or there."""
        engine, report = self.engine, self.report
        report.mode = "staged"
        try:
            with self.clock.phase("plan"):
                self.plan = make_plan(engine, self.target)
                report.placement, report.bytes_by_source = list(self.plan.new.workers), self.plan.bytes_by_source
                self.query = ask_budget(engine, self.plan)
                self.ticket, self.ticket_kind = self.query.post(engine.pool), "budget"
                # asked right behind the budget, so it is in (or nearly) once the budget is
                self.room_ticket = engine.pool.post("staged", "room", workers=list(self.plan.new.workers))
        except SwitchRefused as exc:
            self._refuse(exc)
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc)
        return []

    def _planned(self) -> list:
        """The workers' answer to the plan phase's last question: their budget (then stage, or fall back to
        stop-the-world where staging does not fit), or the pool blocks their staging starts with."""
        engine, replies, kind = self.engine, self.engine.pool.result(self.ticket), self.ticket_kind
        self.ticket = None
        if kind == "begin":
            with self.clock.phase("plan"):
                # the first staged switch of a 4x H100 daemon held serving 1.2-1.4 s: this step took 0.27 s of it
                self.report.add_staging("begin", [r.seconds for r in replies])
                self.pool_blocks = min(r.pool_blocks for w, r in zip(self.involved, replies)
                                       if w in self.plan.new.workers)
                self.tasks = StagingTasks(self.budget.weight_chunks(self.plan),
                                          self.is_cuda and engine.config.cuda_graphs)
            return []
        with self.clock.phase("plan"):
            rooms, self.room_ticket = engine.pool.result(self.room_ticket), None
            try:
                self.capacity = conclude_capacity(engine, self.query, replies)[0]
            except SwitchRefused as exc:
                self._refuse(exc)
                return []
            reason = self.budget.unfit(self.plan, self.capacity, rooms)
            give = self.budget.blocks_to_give_back(self.plan, rooms) if reason is not None else GiveBack(0)
        outputs = []
        if give.blocks:
            outputs, rooms = self._give_back(give.blocks)
            reason = self.budget.unfit(self.plan, self.capacity, rooms)
            reason = reason and f"{reason}, with {give.blocks} free KV blocks given back"
        elif reason is not None and give.why_not:
            reason = f"{reason}; {give.why_not}"
        if reason is not None:
            return outputs + self._stop_the_world(reason)
        with self.clock.phase("plan"):
            self._post("begin", "begin", self.plan, engine.config.block_size, engine.max_model_len)
        return outputs

    def _give_back(self, count: int) -> tuple[list, list]:
        """Shrink the old pool by `count` free blocks so that the target fits beside it, and ask the new workers'
        room again. A pause: the steps in flight drain, the live blocks move and the live batch's decode graphs
        are captured again (give_back_graph_capture). The outputs of the drained steps, and the rooms."""
        with self.clock.phase("give_back"):
            outputs = self.engine.quiesce()
            self.report.transform_detail["give_back_graph_capture"] = self.given_back.give(self.engine, count)
            self.report.kv_blocks_given_back = count
            rooms = self.engine.pool.call("staged", "room", workers=list(self.plan.new.workers))
        # no step runs meanwhile: a pause of its own before the cut's, which the serving pause adds (its 448 ms at
        # 7B on 4x H100 showed only in the clients' pause, while the report said 32 ms)
        self.report.give_back_pause_s = self.report.phases["give_back"]
        return outputs, rooms

    def _refuse(self, exc: SwitchRefused) -> None:
        self.report.state, self.report.error = "refused", str(exc)
        self._finish()

    def _stop_the_world(self, reason: str) -> list:
        log.info("switch %s runs stop-the-world: %s", self.report.id, reason)
        self.report.mode, self.report.mode_reason = "stop_the_world", reason
        self.report.phases.clear()
        outputs = self.engine.quiesce()  # the transaction asks the workers before its own quiesce phase
        transaction = SwitchTransaction(self.engine, self.target, self.report, self.links, self.requested_fault)
        transaction.run()
        if self.report.state != "committed":
            self.given_back.take_back(self.engine)
        self.report.cut_seconds = self.report.total_seconds = time.perf_counter() - self.begun
        self.finished = True
        return outputs + transaction.outputs

    def advance(self) -> list:
        """Between two steps: post the next gap's staging work once the last gap's is done, without draining the
        steps in flight (the workers run it between them; its transfers stay in flight across the next steps), or
        the cut once staging is done. A failing step of the old topology raises here (WorkerError)."""
        try:
            if self.ticket is not None:
                if not self.engine.pool.poll(self.ticket):
                    return []
                if self.ticket_kind in ("budget", "begin"):
                    return self._planned()
                self._settle()
            if self.tasks:
                return self._post_gap()
            running = self.engine.scheduler.running
            per_chunk = self.budget.blocks_per_chunk(self.old, self.plan.new)
            # full blocks are final and every step in flight writes later slots (delta.py): no quiesce needed
            if len(self.ledger.pending(running)) > per_chunk // 2 and self.precopy_rounds < MAX_PRECOPY_ROUNDS:
                with self.clock.phase("precopy"):
                    blocks = self.ledger.next_chunk(running, per_chunk * self.budget.chunks_per_gap)
                    self._post("precopy", "chunk", [], blocks)
                    self.precopy_rounds += 1
                return []
            self.cut = StagedCut(self)
            outputs = self.cut.run()
            self._finish()
            return outputs
        except Exception as exc:  # noqa: BLE001 - rolls back below, or re-raises after commit
            return self._fail(exc)

    def _post(self, kind: str, op: str, *args, workers: list[int] | None = None) -> None:
        self.ticket = self.engine.pool.post("staged", op, *args, workers=workers or self.involved)
        self.ticket_kind = kind

    def _settle(self) -> None:
        """The replies of the last gap's work; a worker's error raises here."""
        replies, kind = self.engine.pool.result(self.ticket), self.ticket_kind
        self.ticket = None
        if kind != "groups":
            self.loaded = all(r.loaded for r in replies)
        self.report.add_staging(kind, [r.seconds for r in replies])
        if kind == "build":
            detail = self.report.transform_detail
            slowest = max((r.loads for r in replies), key=lambda loads: loads["seconds"])
            detail["staging_loads"] = slowest["seconds"]
            detail.update({f"staging_loads_{k}": v for k, v in slowest.items() if k != "seconds"})

    def _post_gap(self) -> list:
        """Post one gap's work; the outputs of steps it finished first (only the groups' gap drains)."""
        kind = self.tasks.next_kind
        with self.clock.phase("groups" if kind == "groups" else "stage"):
            blocks, sizes, engine, drained = 0, [], self.engine, []
            if kind == "graphs":  # decode graphs of the new stages over the pool they will keep, captured while
                # the old topology serves, so that the cut does not wait for them (only for a bucket the batch
                # moved to)
                blocks, kept = self.budget.pool_at_cut(self.pool_blocks, self.capacity, self.ledger.num_copied)
                sizes = expected_batch_sizes(engine, self.plan.new.topology.pp) if kept else []
            work = self.tasks.next_gap(self.loaded, self.budget.chunks_per_gap, sizes)
            if work is not None and work.kind == "groups":
                # the groups' first collectives and hand-offs run on the world group's links, which the steps in
                # flight use too: the first staged switch of a 4x H100 run spent 1.1-1.4 s in them, behind those
                # steps, where a stop-the-world switch's groups phase (steps drained) takes 1-5 ms
                drained = engine.quiesce()
                engine.built_groups |= tp_member_sets(self.plan.new)
                self._post("groups", "groups", self.plan.new, workers=list(range(engine.pool.size)))
            elif work is not None and work.kind == "graphs":
                self._post("graphs", "graphs", blocks, engine.config.max_num_seqs, *work.args,
                           workers=list(self.plan.new.workers))
            elif work is not None:  # None: no graphs to capture
                self._post(work.kind, work.op, *work.args)
        return drained

    def _fail(self, exc: Exception) -> list:
        """Back to the old topology. Before the cut the workers still serve it untouched: drop what was staged.
        Once the cut's transfer began, rebuild it from the store (live requests recompute); a worker failure
        respawns every worker, as in the stop-the-world transaction. Returns the outputs of the steps that were
        still in flight."""
        engine, report = self.engine, self.report
        outputs = self.cut.drained if self.cut else []
        report.error = f"{report.phase}: {exc}".splitlines()[0]
        if self.cut and self.cut.committed:
            self._finish()
            raise exc
        log.warning("staged switch %s failed in %s, rolling back: %s", report.id, report.phase, exc, exc_info=exc)
        try:
            if isinstance(exc, WorkerError):
                engine.placement = self.old
                engine.recover(f"staged switch {report.id} failed in {report.phase}: {exc}".splitlines()[0])
            elif report.phase in ("delta", "commit"):
                engine.preempt_all()
                engine.install(self.old)
            elif self.plan is not None:
                outputs = outputs + engine.quiesce()  # the abort's replies come after the steps'
                engine.pool.call("staged", "abort", workers=self.involved)
                self.given_back.take_back(self.engine)
            report.state = "rolled_back"
        except Exception as again:  # noqa: BLE001
            report.state, report.error = "failed", f"{report.error}; rollback failed: {again}"
            self._finish()
            raise
        self._finish()
        return outputs

    def abandon(self, reason: str) -> None:
        """The workers were respawned under the switch (a failure while serving): nothing staged is left."""
        self.report.state, self.report.error = "rolled_back", reason
        self._finish()

    def _finish(self) -> None:
        self.report.phase = None
        self.report.total_seconds = time.perf_counter() - self.begun
        self.finished = True
        if self.report.mode == "staged":
            self.report.add_stalls(self.engine.step_log.since(self.begun))
