"""Rebuilding the worker pool after a worker died or stopped answering, on the devices that still work.

Every worker restarts (the world group cannot take a new member in place of a dead one). A device whose
worker cannot start again is dropped, and the model goes onto the largest valid topology of the devices
left, the old one first if it still fits. Each recovery is recorded for `rempctl status` and /metrics."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rempd.engine.graph_warmup import warm_kernels
from rempd.engine.links import warm_links
from rempd.topology import Placement, Topology, valid_topologies
from rempd.worker_pool.pool import WorkerError, WorkerPool

log = logging.getLogger("rempd.recovery")
# Tests only (with REMP_ENABLE_FAULT_INJECTION=1): a file of device slots, one per line, whose worker is
# given a device that does not exist on its next start, as a GPU that fell off the bus would behave.
UNUSABLE_DEVICES_ENV = "REMP_FAULT_UNUSABLE_DEVICES_FILE"
UNUSABLE_DEVICE = "unusable-device"


@dataclass
class RecoveryRecord:
    reason: str
    source: str  # topology before
    target: str = ""  # topology after; "" while running or when it failed
    lost_devices: list[str] = field(default_factory=list)  # devices dropped by this recovery
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # close, spawn, install: where the time went
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeviceSlots:
    """The devices the daemon still uses, each with its slot: its index in the configured device list."""
    devices: list[str]
    slots: list[int]
    lost: list[str] = field(default_factory=list)  # "slot N (device)" of every device dropped so far

    @classmethod
    def of(cls, devices: list[str]) -> "DeviceSlots":
        return cls(list(devices), list(range(len(devices))))

    def drop(self, index: int, why: str) -> str:
        name = f"slot {self.slots[index]} ({self.devices[index]}): {why}"
        del self.devices[index], self.slots[index]
        self.lost.append(name)
        return name


def _unusable_slots() -> set[int]:
    path = os.environ.get(UNUSABLE_DEVICES_ENV)
    if not path or os.environ.get("REMP_ENABLE_FAULT_INJECTION") != "1" or not Path(path).is_file():
        return set()
    return {int(line) for line in Path(path).read_text().split() if line.strip().isdigit()}


def spawn_pool(template, slots: DeviceSlots, record: RecoveryRecord, reply_timeout: float | None) -> WorkerPool:
    """A fresh pool on every device whose worker starts; a device whose worker fails to start twice in a row
    (once could be a port or a rendezvous race) is dropped from `slots`."""
    failed_once: set[int] = set()
    while slots.devices:
        unusable = _unusable_slots()
        devices = [UNUSABLE_DEVICE if s in unusable else d for d, s in zip(slots.devices, slots.slots)]
        try:
            return WorkerPool(template, devices, reply_timeout=reply_timeout)
        except WorkerError as exc:
            slot = slots.slots[exc.index]
            if slot not in failed_once:
                failed_once.add(slot)
                log.warning("the worker of device slot %d did not start (%s); trying again", slot, exc)
                continue
            name = slots.drop(exc.index, str(exc).splitlines()[0])
            record.lost_devices.append(name)
            log.error("device %s cannot run a worker; going on without it", name)
    raise RuntimeError("no device can run a worker")


def ensure_store(engine, record: RecoveryRecord) -> None:
    """Reload the weight store from the checkpoint if its segment was deleted under us: running workers keep
    their mappings, but new ones could not attach."""
    from rempd.model.checkpoint import Checkpoint
    from rempd.shm_store.loader import load_into_store
    from rempd.shm_store.store import WeightStore

    if WeightStore.exists(engine.store.name):
        return
    log.error("the weight store /dev/shm/%s was deleted; reloading it from %s", engine.store.name,
              engine.config.model_dir)
    old = engine.store
    engine.store = load_into_store(Checkpoint(engine.config.model_dir))
    engine.template = replace(engine.template, store_name=engine.store.name)
    old.unlink()  # its file is gone already; this drops the handle's finaliser and mapping
    record.reason += "; weight store reloaded from disk"


def candidate_topologies(old: Topology, num_devices: int, cfg) -> list[Topology]:
    """The old topology if it still fits, then every valid one, largest first (wider TP first on a tie)."""
    valid = valid_topologies(num_devices, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
    return sorted(valid, key=lambda t: (t != old, -t.size, -t.tp))


def recover(engine, reason: str) -> RecoveryRecord:
    """Respawn the workers and install the largest topology that still holds the daemon's context length."""
    begin = time.perf_counter()
    old = engine.placement
    record = RecoveryRecord(reason=reason, source=str(old.topology))
    engine.recoveries.append(record)
    engine.pool.close(timeout=2.0)
    engine.in_flight.clear()
    engine.send_failure = None  # the pool it failed on is gone
    engine.preempt_all()
    record.phases["close"] = time.perf_counter() - begin
    ensure_store(engine, record)
    engine.pool = spawn_pool(engine.template, engine.device_slots, record, engine.config.worker_timeout)
    record.phases["spawn"] = time.perf_counter() - begin - record.phases["close"]
    engine.devices = list(engine.device_slots.devices)
    warm_links(engine)
    warm_kernels(engine)  # fresh processes; Triton's disk cache holds what start-up compiled
    failures = []
    for topology in candidate_topologies(old.topology, len(engine.devices), engine.model_config):
        placement = old if topology == old.topology and not record.lost_devices else Placement.default(topology)
        try:
            engine.install(placement)
        except WorkerError:
            raise  # the new pool is broken too: the caller gives up
        except RuntimeError as exc:  # this topology leaves no room for the KV pool
            failures.append(f"{topology}: {exc}")
            continue
        if engine.scheduler.blocks.num_blocks * engine.config.block_size >= engine.max_model_len:
            break
        failures.append(f"{topology}: too little KV room for a {engine.max_model_len}-token context")
    else:
        raise RuntimeError(f"no topology fits the {len(engine.devices)} devices left: {'; '.join(failures)}")
    record.target, record.seconds = str(placement.topology), time.perf_counter() - begin
    record.phases["install"] = record.seconds - record.phases["close"] - record.phases["spawn"]
    level = logging.WARNING if record.target != record.source else logging.INFO
    log.log(level, "recovered from %s: %s → %s on %d devices in %.2f s (%s)%s", reason, record.source,
            record.target, len(engine.devices), record.seconds,
            ", ".join(f"{k} {v:.2f} s" for k, v in record.phases.items()),
            f"; lost {record.lost_devices}" if record.lost_devices else "")
    return record
