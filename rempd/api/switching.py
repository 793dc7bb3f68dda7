"""Control API routes for topology switches: plan (dry run), switch, and the history of switches."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from rempd import systemd
from rempd.api.errors import APIError, documented
from rempd.engine.switch_driver import SwitchInProgress
from rempd.migrate.report import SwitchReport
from rempd.migrate.capacity import SwitchRefused
from rempd.topology import Placement, Topology, TopologyError

log = logging.getLogger("rempd.control")
FAULT_INJECTION_ENV = "REMP_ENABLE_FAULT_INJECTION"  # tests only: lets a switch request inject a fault


class Fault(BaseModel):
    phase: str = Field(pattern="^(plan|quiesce|groups|transform|commit)$")
    kind: str = Field(pattern="^(raise|kill|delay)$")  # delay: the phase takes a second longer


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tp: int = Field(ge=1, le=64)
    pp: int = Field(ge=1, le=256)
    placement: list[int] | None = Field(default=None, description="worker per (pp_rank, tp_rank); chosen if omitted")
    dry_run: bool = False
    mode: str | None = Field(default=None, pattern="^(staged|stop_the_world)$", description=(
        "staged: prepare the new topology while the old one serves, then a short cut (falls back to "
        "stop_the_world when staging cannot fit); stop_the_world: pause serving for the whole switch. "
        "Default: the daemon's switch_mode (stop_the_world unless configured)"))
    fault: Fault | None = None

    def target(self) -> Topology | Placement:
        topology = Topology(self.tp, self.pp)
        if self.placement is None:
            return topology
        try:
            return Placement(topology, tuple(self.placement))
        except TopologyError as exc:
            raise APIError(400, str(exc), param="placement") from exc


def launch_switch(engine: Any, target: Topology | Placement, on_switch: Callable[[SwitchReport], None],
                  fault: tuple[str, str] | None = None, mode: str | None = None) -> tuple[SwitchReport, asyncio.Future]:
    """Start a switch the way every caller must (the API and the policy): systemd hears RELOADING=1, then
    READY=1, and `on_switch` (metrics) hears the end. Raises SwitchInProgress."""
    report, done = engine.start_switch(target, fault, mode)
    systemd.reloading(f"switching to {report.target}")

    def finished(task: asyncio.Future) -> None:
        systemd.ready(f"serving at {report.target if report.state == 'committed' else report.source}")
        on_switch(report)
        if task.exception() is not None:
            log.error("switch %s ended with %s", report.id, task.exception())

    done.add_done_callback(finished)
    return report, done


def add_switch_routes(app: FastAPI, engine_of: Callable[[], Any], on_switch: Callable[[SwitchReport], None]) -> None:
    """`engine_of()` gives the AsyncEngine (None while starting); `on_switch` hears every finished switch."""
    faults_allowed = os.environ.get(FAULT_INJECTION_ENV) == "1"

    def engine() -> Any:
        found = engine_of()
        if found is None:
            raise APIError(503, "rempd is still starting")
        return found

    async def plan_or_refuse(request: SwitchRequest) -> dict:
        try:
            return await engine().plan(request.target())
        except SwitchRefused as exc:
            raise APIError(400, f"refused: {exc}", code="switch_refused") from exc

    @app.post("/v1/plan", responses=documented(400, 403, 503))
    async def plan(request: SwitchRequest) -> dict:
        return await plan_or_refuse(request)

    @app.post("/v1/switch", status_code=202, responses=documented(400, 403, 409, 503))
    async def switch(request: SwitchRequest) -> dict:
        if request.fault is not None and not faults_allowed:
            raise APIError(400, f"fault injection is off (set {FAULT_INJECTION_ENV}=1 to allow it)", param="fault")
        running = engine().running_switch()
        if running is not None:  # answer at once, not after the running switch lets the plan through
            raise APIError(409, f"switch {running.id} is in progress", code="switch_in_progress", param=running.id)
        planned = await plan_or_refuse(request)
        if request.dry_run:
            return {"dry_run": True, "plan": planned}
        fault = (request.fault.phase, request.fault.kind) if request.fault else None
        try:
            report, _ = launch_switch(engine(), request.target(), on_switch, fault, request.mode)
        except SwitchInProgress as exc:
            raise APIError(409, str(exc), code="switch_in_progress", param=exc.switch_id) from exc
        return report.to_dict() | {"plan": planned}

    @app.get("/v1/switches", responses=documented(403, 503))
    async def switches() -> list[dict]:
        return [r.to_dict() for r in engine().engine.switches]

    @app.get("/v1/switches/{switch_id}", responses=documented(403, 404, 503))
    async def one_switch(switch_id: str) -> dict:
        for report in engine().engine.switches:
            if report.id == switch_id:
                return report.to_dict()
        raise APIError(404, f"no switch {switch_id!r}", param="switch_id")
