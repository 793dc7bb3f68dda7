"""The cut of a staged switch: drain the steps in flight, send the KV written since its pre-copy (the delta),
and commit the staged shards. The only pause a staged switch puts on serving (but a give-back's, when the
target did not fit beside the old pool)."""
from __future__ import annotations

import time

from rempd.engine.block_manager import BlockManager
from rempd.engine.graph_warmup import capture_live_graphs
from rempd.migrate.delta import CutLayout


class StagedCut:
    def __init__(self, switch):
        self.switch = switch  # a StagedSwitch whose staging is done
        self.drained: list = []  # outputs of the steps the cut finished: the rollback hands them on if it fails
        self.committed = False

    def run(self) -> list:
        """The outputs of the drained steps not handed on yet."""
        switch = self.switch
        engine, report, budget, ledger = switch.engine, switch.report, switch.budget, switch.ledger
        with switch.clock.phase("quiesce") as start:
            report.staging_seconds = start - switch.begun
            outputs = self.drained = engine.quiesce()
            if switch.emit is not None and outputs:
                switch.emit(outputs)
                outputs = self.drained = []
            # the steps in flight served until here (their tokens are out): the cut is timed from here, the
            # drain is in the quiesce phase
            cut = time.perf_counter()
            live = sorted(engine.scheduler.running, key=lambda s: s.arrival)
            num_blocks, report.kv_pool_kept = budget.pool_at_cut(switch.pool_blocks, switch.capacity,
                                                                 ledger.num_copied)
            while sum(len(s.block_table) for s in live) > num_blocks:
                engine.scheduler.preempt(live.pop())  # the youngest gives way, to be recomputed
                report.requests_preempted += 1
            layout = ledger.layout(live)
            report.requests_live = len(live)
            report.kv_blocks_precopied, report.kv_blocks_delta = layout.num_precopied, len(layout.delta_old)
            report.kv_blocks_migrated = layout.num_precopied + len(layout.delta_old)

        with switch.clock.phase("delta"):
            results = engine.pool.call("staged", "cut", layout.delta_old, layout.delta_new, layout.precopied,
                                       num_blocks, report.kv_pool_kept, workers=switch.involved)
            report.transform_detail["staging_overlapped_steps"] = max(r["overlapped_steps"] for r in results)

        with switch.clock.phase("commit"):
            self._commit(layout, live, num_blocks)
        with switch.clock.phase("resume"):
            report.state = "committed"
        report.cut_seconds = time.perf_counter() - cut
        if outputs:
            engine.last_output_at = time.perf_counter()
        if live:
            engine.pause_report = report  # closed by the first tokens after the cut
        else:  # nothing paused at the cut: the give-back's pause, if any, was all
            report.serving_pause_s = report.give_back_pause_s
        return outputs

    def _commit(self, layout: CutLayout, live: list, num_blocks: int) -> None:
        engine = self.switch.engine
        for seq, table in zip(live, layout.new_tables):
            seq.block_table = table
        engine.scheduler.blocks = BlockManager.holding(num_blocks, engine.config.block_size,
                                                       sum(len(t) for t in layout.new_tables))
        engine.placement = self.switch.plan.new
        # graphs bake in the pool's address: those captured while staging hold when the pool was kept
        self.switch.report.transform_detail["graph_capture"] = capture_live_graphs(engine)
        self.committed = True
