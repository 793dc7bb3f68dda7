"""The reconfiguration transaction: plan → quiesce → groups → transform → commit → resume, one at a time.

It runs on the engine's thread between steps. A failure before commit rolls back to the old placement; the
daemon keeps serving either way and no request is lost (at worst it is recomputed)."""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import asdict
from typing import Callable

from rempd.engine.block_manager import BlockManager
from rempd.engine.graph_warmup import capture_live_graphs, live_buckets
from rempd.migrate.layer_steps import Step, layer_steps
from rempd.migrate.plan import SwitchPlan, plan_switch
from rempd.migrate.predict import LinkSpeeds, phases_of, price
from rempd.migrate.report import SwitchReport
from rempd.migrate.shards import ModelGeometry
from rempd.topology import Placement, Topology, TopologyError, check_topology
from rempd.worker_pool.pool import WorkerError

log = logging.getLogger("rempd.switch")
Fault = tuple[str, str]  # (phase, "raise" | "kill" | "delay"): test-only fault injection


def inject_fault(engine, phase: str, kind: str) -> None:
    if kind == "kill":
        os.kill(engine.pool.pids()[engine.placement.workers[-1]], signal.SIGKILL)
    elif kind == "delay":
        time.sleep(1.0)
    else:
        raise RuntimeError(f"injected fault in {phase}")


class SwitchRefused(ValueError):
    """The target cannot run; nothing changed."""


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


def choose_order(mode: str, topology: Topology, devices: list[str], headrooms: list[tuple[int, int] | None]) -> bool:
    """Whether the transform runs in layer order, from each involved device's headroom (plain, layer order):
    "auto" keeps the plain order where it fits, since layer order waits for the device once per step. Refuses a
    target that fits neither way the mode allows."""
    def short(which: int) -> tuple[int, str] | None:
        worst = min(((left[which], device) for left, device in zip(headrooms, devices) if left is not None),
                     default=None)
        return worst if worst is not None and worst[0] < 0 else None

    plain, layered = short(0), short(1)
    if mode == "never" or (mode == "auto" and plain is None):
        if plain is not None:
            raise SwitchRefused(f"{topology}: {plain[1]} would run out of memory during the switch, where its old "
                                f"and new shards coexist: {-plain[0] / 1e9:.1f} GB short")
        return False
    if layered is not None:
        raise SwitchRefused(f"{topology}: {layered[1]} would run out of memory during the switch even with the new "
                            f"shard built layer by layer as the old one is freed: {-layered[0] / 1e9:.1f} GB short")
    return True


def check_capacity(engine, plan: SwitchPlan) -> tuple[int, int]:
    """(fresh, kept): the blocks a fresh pool would have, and those every new worker's pool memory holds in the
    target's shape if kept (0: the transform does not fit beside it). Chooses the transform's order
    (plan.layer_steps); refuses a target whose transform cannot fit or that cannot hold one full-length sequence.
    One call asks every involved worker all of it."""
    config = engine.config
    # quiesce finishes the steps in flight (a micro-batch per stage and one sent ahead), each of which may give
    # every running sequence one more block: the live KV held beside the new pool is priced with that growth
    growth = len(engine.scheduler.running) * (engine.placement.topology.pp + 1)
    involved = sorted(set(plan.old.workers) | set(plan.new.workers))
    geo = ModelGeometry(engine.model_config, engine.template.dtype)
    if config.switch_in_place != "never":  # the workers price both orders
        plan.layer_steps = layer_steps(plan, geo, config.switch_round_bytes)
    budgets = dict(zip(involved, engine.pool.call("switch_budget", plan, config.block_size,
                                                  config.switch_round_bytes, growth, workers=involved)))
    if not choose_order(config.switch_in_place, plan.new.topology, [engine.devices[w] for w in involved],
                        [budgets[w].headroom for w in involved]):
        plan.layer_steps = None
    fresh = min(budgets[w].capacity for w in plan.new.workers)
    needed = engine.scheduler.blocks.blocks_for(engine.max_model_len)
    if fresh < needed:
        raise SwitchRefused(f"{plan.new.topology}: the model does not fit: room for {fresh} KV blocks, "
                            f"{needed} needed for one {engine.max_model_len}-token sequence")
    return fresh, min(budgets[w].kept_blocks[plan.in_place] for w in plan.new.workers)


REUSE_SHARE = 0.9  # a switch keeps the pools' memory if that costs at most a tenth of the KV capacity


def choose_pool(engine, fresh_blocks: int, kept_blocks: int) -> tuple[int, bool]:
    """(blocks, kept): keep every new worker's pool memory, viewed in the new shape (nothing freed, allocated or
    zeroed), when it holds nearly what a fresh pool would; else size a fresh pool."""
    if kept_blocks >= max(engine.scheduler.blocks.blocks_for(engine.max_model_len), REUSE_SHARE * fresh_blocks):
        return kept_blocks, True
    return fresh_blocks, False


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
        self.fault = fault
        self.on_phase = on_phase or (lambda report: None)
        self.outputs: list = []  # request outputs produced while quiescing, for the caller to deliver

    def _enter(self, phase: str) -> float:
        self.report.phase = phase
        self.on_phase(self.report)
        if self.fault and self.fault[0] == phase:
            kind, self.fault = self.fault[1], None
            inject_fault(self.engine, phase, kind)
        return time.perf_counter()

    def _leave(self, phase: str, start: float) -> None:
        self.report.phases[phase] = time.perf_counter() - start

    def run(self) -> SwitchReport:
        engine, report = self.engine, self.report
        begin = time.perf_counter()
        old = engine.placement
        committed = False
        try:
            start = self._enter("plan")
            plan = make_plan(engine, self.target)
            report.plan_detail["placement"] = time.perf_counter() - start
            fresh_blocks, kept_blocks = check_capacity(engine, plan)
            report.plan_detail["capacity"] = time.perf_counter() - start - report.plan_detail["placement"]
            num_blocks, report.kv_pool_kept = choose_pool(engine, fresh_blocks, kept_blocks)
            if not self.keep_pool:
                num_blocks, report.kv_pool_kept = fresh_blocks, False
            self._leave("plan", start)

            start = self._enter("quiesce")
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
            self._leave("quiesce", start)

            start = self._enter("groups")
            engine.pool.call("prepare_groups", plan.new)
            engine.built_groups |= tp_member_sets(plan.new)
            self._leave("groups", start)

            start = self._enter("transform")
            live_blocks = [b for s in live for b in s.block_table]
            involved = sorted(set(old.workers) | set(plan.new.workers))
            max_len = engine.max_model_len
            results = engine.pool.call("switch", plan, live_blocks, num_blocks, engine.config.block_size,
                                       max_len, engine.config.switch_round_bytes, self.keep_pool,
                                       workers=involved)
            self._leave("transform", start)
            report.add_transform(results)

            start = self._enter("commit")
            self._commit(plan, live, num_blocks)
            committed = True
            report.kv_blocks_migrated = len(live_blocks)
            self._leave("commit", start)

            start = self._enter("resume")
            self._leave("resume", start)
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
            self.on_phase(report)
        return report

    def _commit(self, plan: SwitchPlan, live: list, num_blocks: int) -> None:
        """Live blocks now sit compacted at ids 0..n-1 of the new pool; give each sequence its new ids."""
        engine = self.engine
        blocks = BlockManager(num_blocks, engine.config.block_size)
        next_id = 0
        for seq in live:
            count = len(seq.block_table)
            seq.block_table = list(range(next_id, next_id + count))
            next_id += count
        blocks.free_blocks = deque(range(next_id, num_blocks))
        engine.scheduler.blocks = blocks
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
