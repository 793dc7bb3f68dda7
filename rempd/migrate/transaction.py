"""The reconfiguration transaction: plan → quiesce → groups → transform → commit → resume, one at a time.

It runs on the engine's thread between steps. A failure before commit rolls back to the old placement; the
daemon keeps serving either way and no request is lost (at worst it is recomputed)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable

from rempd.engine.block_manager import BlockManager
from rempd.engine.graph_warmup import capture_live_graphs, live_buckets
from rempd.migrate.capacity import SwitchRefused, check_capacity, choose_pool
from rempd.migrate.layer_steps import Step
from rempd.migrate.phase_clock import Fault, PhaseClock
from rempd.migrate.plan import SwitchPlan, plan_switch
from rempd.migrate.predict import LinkSpeeds, phases_of, price
from rempd.migrate.report import SwitchReport
from rempd.migrate.shards import ModelGeometry
from rempd.topology import Placement, Topology, TopologyError, check_topology
from rempd.worker_pool.pool import WorkerError

log = logging.getLogger("rempd.switch")


def make_plan(engine, target: Topology | Placement, steps: list[Step] | None = None) -> SwitchPlan:
    """Validate the target and plan the moves for the KV live now (in the given layer order, if any: the steps
    depend on the placements alone). No side effects."""
    cfg, config = engine.model_config, engine.config
    topology = target.topology if isinstance(target, Placement) else target
    try:
        check_topology(topology, len(engine.devices), cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
    except TopologyError as exc:
        raise SwitchRefused(str(exc)) from exc
    geo = ModelGeometry(cfg, engine.template.dtype)
    live = sum(len(s.block_table) for s in engine.scheduler.running)
    plan = plan_switch(geo, engine.placement, target, len(engine.devices), live, config.block_size)
    plan.layer_steps = steps
    return plan


def tp_member_sets(placement: Placement) -> set[tuple[int, ...]]:
    return {tuple(sorted(placement.tp_group(p))) for p in range(placement.topology.pp)} - {()}


def new_groups(engine, plan: SwitchPlan) -> int:
    """Groups of the target that no switch or warm-up has built yet."""
    return sum(1 for key in tp_member_sets(plan.new) if len(key) > 1 and key not in engine.built_groups)


class SwitchTransaction:
    def __init__(self, engine, target: Topology | Placement, report: SwitchReport, links: LinkSpeeds,
                 fault: Fault | None = None, on_phase: Callable[[SwitchReport], None] | None = None,
                 keep_pool: bool = True):
        self.engine, self.target, self.report, self.links = engine, target, report, links
        self.keep_pool = keep_pool  # False: free and allocate the pool even where it could be kept
        self.clock = PhaseClock(engine, report, fault, on_phase)
        self.outputs: list = []  # request outputs produced while quiescing, for the caller to deliver

    def run(self) -> SwitchReport:
        engine, report = self.engine, self.report
        begin = time.perf_counter()
        old = engine.placement
        committed = False
        try:
            with self.clock.phase("plan") as start:
                plan = make_plan(engine, self.target)
                report.plan_detail["placement"] = time.perf_counter() - start
                fresh_blocks, kept_blocks = check_capacity(engine, plan)
                report.plan_detail["capacity"] = time.perf_counter() - start - report.plan_detail["placement"]
                num_blocks, report.kv_pool_kept = choose_pool(engine, fresh_blocks, kept_blocks)
                if not self.keep_pool:
                    num_blocks, report.kv_pool_kept = fresh_blocks, False

            with self.clock.phase("quiesce"):
                self.outputs += engine.quiesce()
                live = sorted(engine.scheduler.running, key=lambda s: s.arrival)
                while sum(len(s.block_table) for s in live) > num_blocks:
                    engine.scheduler.preempt(live.pop())  # the youngest gives way, to be recomputed
                    report.requests_preempted += 1
                plan = make_plan(engine, plan.new, plan.layer_steps)  # the live KV is final now
                report.placement, report.bytes_by_source = list(plan.new.workers), plan.bytes_by_source
                report.in_place = plan.in_place
                buckets = live_buckets(engine, plan.new.topology.pp)
                priced = price(plan, self.links, new_groups(engine, plan), not report.kv_pool_kept, buckets)
                report.priced, report.predicted = asdict(priced), phases_of(priced, self.links)
                report.requests_live = len(live)

            with self.clock.phase("groups"):
                engine.pool.call("prepare_groups", plan.new)
                engine.built_groups |= tp_member_sets(plan.new)

            with self.clock.phase("transform"):
                live_blocks = [b for s in live for b in s.block_table]
                involved = sorted(set(old.workers) | set(plan.new.workers))
                results = engine.pool.call("switch", plan, live_blocks, num_blocks, engine.config.block_size,
                                           engine.max_model_len, engine.config.switch_round_bytes, self.keep_pool,
                                           workers=involved)
            report.add_transform(results)

            with self.clock.phase("commit"):
                self._commit(plan, live, num_blocks)
                committed = True
                report.kv_blocks_migrated = len(live_blocks)

            with self.clock.phase("resume"):
                report.state = "committed"
        except SwitchRefused as exc:
            report.state, report.error = "refused", str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure before commit rolls back
            report.error = f"{report.phase}: {exc}".splitlines()[0]
            if committed:
                raise
            self._rollback(old, exc)
        finally:
            report.phase = None
            report.total_seconds = time.perf_counter() - begin
            self.clock.on_phase(report)
        return report

    def _commit(self, plan: SwitchPlan, live: list, num_blocks: int) -> None:
        """Live blocks now sit compacted at ids 0..n-1 of the new pool; give each sequence its new ids."""
        engine = self.engine
        engine.scheduler.blocks = BlockManager.renumbered(live, num_blocks, engine.config.block_size)
        engine.placement = plan.new
        self.report.transform_detail["graph_capture"] = capture_live_graphs(engine)

    def _rollback(self, old: Placement, exc: Exception) -> None:
        """Back to the old placement. Before transform the workers are untouched; after it started, their
        shards are rebuilt from the weight store and live requests recompute their KV. A worker that failed
        may have left its peers blocked in a transfer with it, so then every worker is restarted."""
        engine, report = self.engine, self.report
        log.warning("switch %s failed in %s, rolling back: %s", report.id, report.phase, exc, exc_info=exc)
        touched = report.phase in ("transform", "commit")
        try:
            if isinstance(exc, WorkerError):
                engine.placement = old
                engine.recover(f"switch {report.id} failed in {report.phase}: {exc}".splitlines()[0])
            elif touched:
                engine.preempt_all()
                engine.install(old)
            report.state = "rolled_back"
        except Exception as again:  # noqa: BLE001
            report.state, report.error = "failed", f"{report.error}; rollback failed: {again}"
            raise
