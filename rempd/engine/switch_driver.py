"""Switches of a running engine, driven from its thread: the dry-run plan, a stop-the-world switch in one go, and a
staged switch advanced a little between two steps while the old topology keeps serving."""
from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Callable

from rempd.engine.graph_warmup import live_buckets
from rempd.engine.llm_engine import LLMEngine
from rempd.engine.outputs import RequestOutput
from rempd.migrate.capacity import BudgetQuery, ask_budget, choose_pool, conclude_capacity
from rempd.migrate.predict import plan_summary
from rempd.migrate.report import SwitchReport
from rempd.migrate.staging import StagedSwitch, StagingOptions
from rempd.migrate.phase_clock import Fault
from rempd.migrate.transaction import make_plan, new_groups
from rempd.topology import Placement, Topology
from rempd.worker_pool.pool import WorkerError
from rempd.worker_pool.ticket import Ticket

log = logging.getLogger("rempd.engine")


@dataclass
class PendingPlan:
    """A dry run whose workers' answer is awaited between steps, and the future its caller waits on."""
    query: BudgetQuery
    ticket: Ticket
    done: concurrent.futures.Future


class SwitchInProgress(RuntimeError):
    def __init__(self, switch_id: str):
        super().__init__(f"switch {switch_id} is in progress")
        self.switch_id = switch_id


class SwitchDriver:
    """start_plan, advance_plans, run, advance and abandon run on the engine thread, running and new_report on the
    caller's. `emit` hands outputs to their streams; `recover` respawns the workers after a failure."""

    def __init__(self, engine: LLMEngine, emit: Callable[[list[RequestOutput]], None], recover: Callable[[], None]):
        self.engine = engine
        self.emit = emit
        self.recover = recover
        # a staged switch in progress, advanced between steps, and the future its caller waits on
        self.staging: tuple[StagedSwitch, concurrent.futures.Future] | None = None
        self.plans: list[PendingPlan] = []  # dry runs waiting for the workers' answer

    def start_plan(self, target: Topology | Placement, done: concurrent.futures.Future) -> None:
        """A dry run that holds no serving step: plan here and post the workers' part, which advance_plans reads
        between later steps (waiting for it held the steps 15-30 ms on 4x H100, 7B). Idle, it answers at once.
        `done` gets plan's summary, or SwitchRefused."""
        engine = self.engine
        try:
            query = ask_budget(engine, make_plan(engine, target))
            if engine.has_unfinished():
                self.plans.append(PendingPlan(query, query.post(engine.pool), done))
            else:
                done.set_result(self._summary(query, query.call(engine.pool)))
        except WorkerError as exc:
            done.set_exception(exc)
            self.recover()
        except Exception as exc:  # noqa: BLE001 - the caller gets it (SwitchRefused: the target cannot run)
            done.set_exception(exc)

    def advance_plans(self) -> None:
        """Answer the dry runs whose workers have replied."""
        for pending in list(self.plans):
            try:
                if not self.engine.pool.poll(pending.ticket):
                    continue
                self.plans.remove(pending)
                pending.done.set_result(self._summary(pending.query, self.engine.pool.result(pending.ticket)))
            except WorkerError:
                self.recover()  # which fails every plan still waiting (abandon)
                return
            except Exception as exc:  # noqa: BLE001
                pending.done.set_exception(exc)

    def _summary(self, query: BudgetQuery, replies: list) -> dict:
        engine, plan = self.engine, query.plan
        _, kept = choose_pool(engine, *conclude_capacity(engine, query, replies))
        buckets = live_buckets(engine, plan.new.topology.pp)
        summary = plan_summary(plan, engine.links, new_groups(engine, plan), not kept, buckets)
        return summary | {"kv_pool_kept": kept}

    def running(self) -> SwitchReport | None:
        current = self.engine.switches[-1] if self.engine.switches else None
        return current if current is not None and not current.done else None

    def new_report(self, target: Topology | Placement) -> SwitchReport:
        """The report of a new switch, in the engine's history from now on. Raises SwitchInProgress while another
        switch runs."""
        current = self.running()
        if current is not None:
            raise SwitchInProgress(current.id)
        report = SwitchReport(id=f"sw-{len(self.engine.switches) + 1}", source=str(self.engine.placement),
                              target=str(target.topology if isinstance(target, Placement) else target))
        self.engine.switches.append(report)
        return report

    def run(self, target: Topology | Placement, report: SwitchReport, fault: Fault | None, mode: str | None,
            done: concurrent.futures.Future) -> None:
        """A stop-the-world switch whole, or the start of a staged one (advance() carries it on)."""
        engine = self.engine
        if (mode or engine.config.switch_mode) == "stop_the_world":
            begun = time.perf_counter()
            self.emit(engine.switch(target, report, fault))
            report.cut_seconds = time.perf_counter() - begun  # the engine stepped at no point of it
            done.set_result(report)
            return
        options = StagingOptions(engine.config.staging_memory, engine.config.staging_chunk_bytes)
        staged = StagedSwitch(engine, target, report, engine.links, options, fault, self.emit)
        self.emit(staged.begin())
        if staged.finished:
            done.set_result(report)
        else:
            self.staging = (staged, done)

    def advance(self) -> None:
        staged, done = self.staging
        try:
            self.emit(staged.advance())
        except WorkerError as exc:  # the old topology failed a step
            log.error("worker failure while staging: %s", exc)
            self.abandon(f"worker failure while staging: {exc}".splitlines()[0])
            self.recover()
            return
        except Exception as exc:  # noqa: BLE001 - failed after commit, or its rollback failed
            self.staging = None
            done.set_exception(exc)
            self.recover()
            return
        if staged.finished:
            self.staging = None
            done.set_result(staged.report)

    def abandon(self, reason: str) -> None:
        """The workers are being respawned: end the staged switch in progress, if any, unfinished (its report says
        why), and the dry runs waiting for an answer."""
        for pending in self.plans:
            pending.done.set_exception(RuntimeError(f"the workers were restarted during the plan: {reason}"))
        self.plans.clear()
        if self.staging is not None:
            staged, done = self.staging
            self.staging = None
            staged.abandon(reason)
            done.set_result(staged.report)
