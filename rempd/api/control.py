"""The control API (served on the Unix socket): GET /v1/status here; the switch routes (switching.py) and the
policy and profile routes (policy_routes.py) join it.

The daemon gathers everything rempctl shows, device memory and utilisation included, so that
rempctl stays a thin renderer with no NVML or psutil of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from fastapi import FastAPI

from rempd.api.errors import documented, install_error_handlers
from rempd.api.policy_routes import add_policy_routes
from rempd.api.switching import add_switch_routes
from rempd.protocol import API_VERSION, DaemonState, PolicyStatus, StatusResponse, TopologyInfo, WorkerStatus

log = logging.getLogger("rempd.control")


@dataclass
class Lifecycle:
    """What the daemon is doing: written by the daemon, read by the control API."""
    state: DaemonState = "starting"
    progress: str | None = None  # the start-up step under way
    engine: Any | None = None  # the AsyncEngine once it is up
    on_switch: Callable[[Any], None] = lambda report: None  # hears every finished switch (metrics)
    model_name: str | None = None
    policy: Any | None = None  # the policy.runner.PolicyRunner once the engine is up
    started: float = field(default_factory=time.monotonic)


def create_control_app(life: Lifecycle, probe: "ResourceProbe | None" = None) -> FastAPI:
    app = FastAPI(title="rempd control API", version=str(API_VERSION), docs_url=None, redoc_url=None)
    install_error_handlers(app)
    probe = probe or ResourceProbe()

    @app.get("/v1/status", response_model=StatusResponse, responses=documented(403))
    async def status() -> dict:
        # NVML and /proc reads block; keep them off the loop that streams tokens.
        return (await asyncio.to_thread(build_status, life, probe)).to_dict()

    add_switch_routes(app, lambda: life.engine, lambda report: life.on_switch(report))
    add_policy_routes(app, lambda: life.policy)
    return app


def build_status(life: Lifecycle, probe: "ResourceProbe") -> StatusResponse:
    status = StatusResponse(api_version=API_VERSION, version=_version(), state=life.state, pid=os.getpid(),
                            uptime_s=round(time.monotonic() - life.started, 3), model=life.model_name,
                            progress=life.progress if life.state == "starting" else None)
    engine = life.engine
    if engine is None:
        return status
    raw, stats = engine.status(), engine.stats()
    if status.state == "serving" and not engine.is_healthy:
        status.state = "recovering"
    status.max_model_len = engine.max_model_len
    status.topology = TopologyInfo(**raw["topology"])
    status.placement = list(raw.get("placement", []))
    status.workers = [WorkerStatus(
        index=w["index"], device=str(w["device"]), pid=w.get("pid"), state=w["state"], pp_rank=w.get("pp_rank"),
        tp_rank=w.get("tp_rank"), weight_bytes=int(w.get("weight_bytes") or 0),
        kv_blocks=int(w.get("kv_blocks") or 0)) for w in raw.get("workers", [])]
    probe.fill(status.workers)
    status.requests_running, status.requests_waiting = stats.num_running, stats.num_waiting
    status.kv_blocks_used, status.kv_blocks_total = stats.kv_blocks_used, stats.kv_blocks_total
    status.kv_usage, status.num_preempted = stats.kv_usage, stats.num_preempted
    status.num_recoveries = int(raw.get("num_recoveries", 0))
    if life.policy is not None:
        status.policy = PolicyStatus.from_dict(life.policy.status())
    status.lost_devices = [str(d) for d in raw.get("lost_devices") or []]
    last = raw.get("last_recovery")
    if last:
        outcome = f"{last['source']} → {last['target']}" if last["target"] else f"{last['source']}, not recovered"
        status.last_recovery = (f"{outcome} after {last['reason']} ({last['seconds']:.1f} s, "
                                f"{time.strftime('%H:%M:%S', time.localtime(last['at']))})")
    return status


class ResourceProbe:
    """Memory and utilisation per worker: NVML for GPUs, psutil for CPU workers; None when unknown."""

    def __init__(self) -> None:
        self.processes: dict[int, Any] = {}  # kept so cpu_percent() measures since the last call
        self.nvml: Any = None
        self.nvml_tried = False

    def fill(self, workers: list[WorkerStatus]) -> None:
        live = {w.pid for w in workers}
        for pid in [p for p in self.processes if p not in live]:  # workers respawned after a failure
            del self.processes[pid]
        for worker in workers:
            try:
                if worker.device.startswith("cuda"):
                    self._gpu(worker)
                else:
                    self._cpu(worker)
            except Exception as exc:  # a probe must never fail a status call
                log.debug("no resource figures for worker %d: %s", worker.index, exc)

    def _cpu(self, worker: WorkerStatus) -> None:
        import psutil

        if worker.pid is None or worker.state == "dead":
            return
        proc = self.processes.get(worker.pid)
        if proc is None or not proc.is_running():
            proc = self.processes[worker.pid] = psutil.Process(worker.pid)
        with proc.oneshot():
            worker.memory_used_bytes = proc.memory_info().rss
            worker.utilization_pct = proc.cpu_percent(None)
        worker.memory_total_bytes = psutil.virtual_memory().total

    def _gpu(self, worker: WorkerStatus) -> None:
        nvml = self._nvml()
        if nvml is None:
            return
        handle = _nvml_handle(nvml, int(worker.device.partition(":")[2] or 0))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        worker.memory_used_bytes, worker.memory_total_bytes = int(memory.used), int(memory.total)
        worker.utilization_pct = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _nvml(self) -> Any:
        if not self.nvml_tried:
            self.nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
            except Exception as exc:  # no nvidia-ml-py, or no driver
                log.info("NVML unavailable, GPU memory not reported: %s", exc)
        return self.nvml


def _nvml_handle(nvml: Any, cuda_index: int) -> Any:
    """NVML counts all GPUs; CUDA only those in CUDA_VISIBLE_DEVICES, in that order."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entry = visible[cuda_index]
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    return nvml.nvmlDeviceGetHandleByUUID(entry)


def _version() -> str:
    try:
        return metadata.version("remp")
    except metadata.PackageNotFoundError:
        return "0+unknown"  # running from a source tree that was never installed
