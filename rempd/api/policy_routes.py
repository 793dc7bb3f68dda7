"""Control API routes of the topology policy: show and set it (/v1/policy), and the profile sweep (/v1/profile)."""
from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from rempd.api.errors import APIError, documented


class PolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "manual"] | None = None
    slo_ttft: float | None = Field(default=None, gt=0, le=3600, description="p90 time to first token, seconds")
    slo_itl: float | None = Field(default=None, gt=0, le=3600, description="p90 inter-token latency, seconds")


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topologies: list[str] | None = Field(default=None, description='e.g. ["TP4PP1", "TP1PP4"]; all valid if omitted')
    concurrency: list[int] = Field(default=[1, 4, 16], min_length=1, max_length=8)
    requests: int = Field(default=16, ge=1, le=4096, description="requests per concurrency level")
    prompt_tokens: int = Field(default=128, ge=1, le=1 << 20)
    output_tokens: int = Field(default=64, ge=1, le=1 << 20)


def add_policy_routes(app: FastAPI, runner_of: Callable[[], Any]) -> None:
    """`runner_of()` gives the PolicyRunner, or None while rempd starts."""

    def runner() -> Any:
        found = runner_of()
        if found is None:
            raise APIError(503, "rempd is still starting")
        return found

    @app.get("/v1/policy", responses=documented(403, 503))
    async def show() -> dict:
        return runner().show()

    @app.post("/v1/policy", responses=documented(400, 403, 503))
    async def update(request: PolicyUpdate) -> dict:
        found = runner()
        if request.mode == "auto" and not found.profiles.topologies:
            raise APIError(400, "no profiles yet: run `rempctl profile` first (or give the daemon a profile file)",
                           code="no_profiles", param="mode")
        found.set(request.mode, request.slo_ttft, request.slo_itl)
        return found.show()

    @app.post("/v1/profile", status_code=202, responses=documented(400, 403, 409, 503))
    async def profile(request: ProfileRequest) -> dict:
        from rempd.policy.sweep import SweepRequest
        from rempd.topology import Topology

        found = runner()
        if found.sweep.running:
            raise APIError(409, "a profile sweep is already running", code="profile_in_progress")
        running = found.engine.running_switch() if found.engine is not None else None
        if running is not None:
            raise APIError(409, f"switch {running.id} is in progress", code="switch_in_progress", param=running.id)
        if any(c < 1 or c > 1024 for c in request.concurrency):
            raise APIError(400, "concurrency levels must be in 1..1024", param="concurrency")
        valid = found.candidates(profiled_only=False)
        names = None
        if request.topologies is not None:
            names = []
            for raw in request.topologies:
                try:
                    name = str(Topology.parse(raw))
                except ValueError:
                    raise APIError(400, f"{raw!r} is not a topology such as TP2PP2", param="topologies") from None
                if name not in valid:
                    raise APIError(400, f"{name} is not a valid topology here (valid: {', '.join(valid)})",
                                   param="topologies")
                names.append(name)
        found.sweep.start(SweepRequest(names, request.concurrency, request.requests, request.prompt_tokens,
                                       request.output_tokens))
        return found.sweep.to_dict()

    @app.get("/v1/profile", responses=documented(403, 503))
    async def sweep() -> dict:
        found = runner()
        return found.sweep.to_dict() | {"profiles": found.profiles.to_dict(),
                                        "profile_path": str(found.config.profile_path or "")}
