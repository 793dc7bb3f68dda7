"""The engine's view of its links, set up once at start-up: groups and peer connections opened before any KV
pool takes their memory, link speeds measured for plan's predictions, and the costs it learns calibrated."""
from __future__ import annotations

import logging
import time

from rempd.engine.graph_warmup import capture_graphs
from rempd.migrate.predict import LinkSpeeds, Price
from rempd.migrate.report import SwitchReport
from rempd.migrate.transaction import SwitchTransaction
from rempd.topology import Placement, Topology, group_member_sets, stage_layers, valid_topologies

log = logging.getLogger("rempd.engine")


def warm_links(engine) -> None:
    """Build the groups every valid topology may use and connect every pair of workers, before any KV pool
    takes the memory those connections need."""
    cfg = engine.model_config
    topologies = valid_topologies(len(engine.devices), cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
    member_sets = group_member_sets(topologies, len(engine.devices))
    engine.warm_seconds = max(engine.pool.call("warm_links", member_sets))
    engine.built_groups = set(member_sets)
    log.info("groups built and peer links opened in %.3f s", engine.warm_seconds)


def measure_links(engine) -> LinkSpeeds:
    """Host-store, peer and local copy speeds, and the costs of a group and an RPC, for plan's predictions."""
    results = engine.pool.call("measure_links")
    start = time.perf_counter()
    engine.pool.call("info")
    rpc = time.perf_counter() - start

    def speed(key: str) -> float:
        rates = sorted(r["bytes"] / r[key] / 1e9 for r in results if r.get(key))
        return rates[len(rates) // 2] if rates else 1.0

    built = [(i["group_seconds"], i["groups_built"]) for i in engine.shard_infos if i["groups_built"]]
    group = max((sec / n for sec, n in built), default=0.0)
    steps = sorted(r["step"] for r in results if "step" in r)
    return LinkSpeeds(speed("host"), speed("peer"), speed("local"), group, rpc,
                      step_seconds=steps[len(steps) // 2] if steps else 0.0)


def calibration_switch(engine, keep_pool: bool, target: Placement | Topology | None = None) -> SwitchReport:
    """A switch with nothing live, onto the placement in use unless told; not in the history."""
    target = engine.placement if target is None else target
    report = SwitchReport(id="calibration", source=str(engine.placement),
                          target=str(target.topology if isinstance(target, Placement) else target))
    SwitchTransaction(engine, target, report, engine.links, keep_pool=keep_pool).run()
    if report.state != "committed":
        raise RuntimeError(f"the start-up calibration switch failed: {report.error}")
    return report


def calibrate(engine) -> None:
    """Switch twice onto the placement in use, with nothing live: the first frees the KV pool and the old weights
    and allocates a new pool, as a switch that cannot keep the pool does (on 4× H100 that costs 3-6× what install's
    allocation alone suggests); the second keeps the pool. What each spent beyond its bytes and links sets the
    learned costs of its regime (LinkSpeeds.learn), the plan and quiesce phases' among them. Nothing changes for a
    client; neither is in the history."""
    fresh, kept = calibration_switch(engine, keep_pool=False), calibration_switch(engine, keep_pool=True)
    for report in (kept, fresh):  # a fresh pool is priced beyond the kept pool's fixed cost: learn that first
        engine.links.learn(Price(**report.priced), report.phases, rate=1.0)
    # the switch dropped the decode graphs: one bucket's capture, its kernels compiled by install's, prices a
    # switch's (per layer of a stage); then every bucket again, ready for the first requests
    layers = max(len(r) for r in stage_layers(engine.model_config.num_layers, engine.placement.topology.pp))
    engine.links.graph_seconds_per_layer = capture_graphs(engine, [1]) / layers
    if engine.config.cuda_graphs and not engine.config.is_cpu:
        warm_first_captures(engine)
    capture_graphs(engine)
    log.info("calibration switches: %.3f s keeping the KV pool (%.3f s fixed cost), %.3f s with a fresh one",
             kept.total_seconds, engine.links.fixed_seconds, fresh.total_seconds)


def warm_first_captures(engine) -> list[int]:
    """Visit, with nothing live, each other TP size that uses every device, capturing one decode graph there, then
    come back; the TP sizes visited. A worker's first capture in a TP size took 0.14-0.19 s where later ones take
    0.03 s, with the kernels compiled and their matmul shapes run at start-up (4x H100, 7B;
    bench/first_switch_capture.py): the first live switch into each TP size paid it inside its pause, and a staged
    switch in one serving gap."""
    home, size = engine.placement, len(engine.devices)
    cfg = engine.model_config
    tp_sizes = sorted({t.tp for t in valid_topologies(size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
                       if t.size == size and t.tp != home.topology.tp})
    start = time.perf_counter()
    for tp in tp_sizes:
        calibration_switch(engine, keep_pool=True, target=Topology(tp, size // tp))
        capture_graphs(engine, [1])
    if tp_sizes:
        calibration_switch(engine, keep_pool=True, target=home)
        log.info("first captures in TP sizes %s warmed in %.3f s", tp_sizes, time.perf_counter() - start)
    return tp_sizes
