"""`rempctl profile`: a short sweep the daemon runs itself, one topology after another. No torch.

For each topology: switch to it (the ordinary switch path), one warm-up wave per level, then closed loops at a
few concurrencies with synthetic prompts of the reference shape. A closed loop at concurrency c serves
some rate X(c) with some latency: each level is one profile point (X, TTFT p90, ITL p90), and the ceiling
is the highest X. The daemon returns to the topology it started from. Clients may keep using the daemon
meanwhile, but they share the engine with the sweep and are counted in none of its figures.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rempd.engine.sampling_params import SamplingParams
from rempd.policy.profile import ProfilePoint, TopologyProfile
from rempd.policy.window import percentile
from rempd.topology import Topology

if TYPE_CHECKING:
    from rempd.policy.runner import PolicyRunner

log = logging.getLogger("rempd.policy")


@dataclass
class SweepRequest:
    topologies: list[str] | None = None  # every candidate topology if None
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 16  # per level (at least twice the concurrency)
    prompt_tokens: int = 128
    output_tokens: int = 64
    seed: int = 0


class ProfileSweep:
    def __init__(self, runner: "PolicyRunner"):
        self.runner = runner
        self.state = "idle"  # idle | running | done | failed
        self.progress = ""
        self.error: str | None = None
        self.request: SweepRequest | None = None
        self.measured: dict[str, Any] = {}
        self.started_at: float | None = None
        self.seconds: float | None = None
        self.task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self, request: SweepRequest) -> None:
        self.state, self.progress, self.error, self.request, self.measured = "running", "starting", None, request, {}
        self.started_at, self.seconds = time.time(), None
        self.task = asyncio.ensure_future(self.run(request))

    def to_dict(self) -> dict:
        return {"state": self.state, "progress": self.progress, "error": self.error, "started_at": self.started_at,
                "seconds": self.seconds, "request": asdict(self.request) if self.request else None,
                "measured": self.measured}

    async def run(self, request: SweepRequest) -> None:
        runner, begin = self.runner, time.monotonic()
        original = runner.current()
        try:
            wanted = request.topologies or runner.candidates(profiled_only=False)
            shape = (request.prompt_tokens, request.output_tokens)
            if shape != (runner.profiles.prompt_tokens, runner.profiles.output_tokens):
                # rates of another request shape cannot be compared with these: start the set afresh
                runner.profiles.topologies.clear()
                runner.profiles.prompt_tokens, runner.profiles.output_tokens = shape
            for name in wanted:
                if not await self.switch_to(name):
                    continue
                profile = await self.profile(name, request)
                runner.profiles.topologies[name] = profile
                self.measured[name] = asdict(profile)
                runner.dirty = True
            await self.switch_to(original)
            runner.plans.clear()
            runner.save()
            self.state = "done"
        except Exception as exc:
            log.exception("profile sweep failed")
            self.state, self.error = "failed", str(exc)
        finally:
            self.seconds = time.monotonic() - begin
            self.progress = ""

    async def switch_to(self, name: str) -> bool:
        runner = self.runner
        if runner.current() == name:
            return True
        self.progress = f"switching to {name}"
        report, done = runner.launch(runner.engine, Topology.parse(name))
        await asyncio.wait([done])  # its report says how it ended
        if report.state != "committed":
            self.measured[name] = {"error": f"switch {report.state}: {report.error}"}
            log.warning("profile: could not switch to %s (%s)", name, report.error)
            return False
        runner.switch_ended_at = time.monotonic()
        return True

    async def profile(self, name: str, request: SweepRequest) -> TopologyProfile:
        engine = self.runner.engine
        limit = engine.max_model_len - 1
        prompt_len = max(1, min(request.prompt_tokens, limit - request.output_tokens))
        output_len = max(1, min(request.output_tokens, limit - prompt_len))
        vocab = engine.engine.model_config.vocab_size
        rng = random.Random(request.seed)
        ids = itertools.count()

        async def one() -> tuple[float | None, list[float]]:
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
            sent = last = time.monotonic()
            ttft, gaps = None, []
            async for out in engine.generate(f"profile-{next(ids)}", prompt, params):
                if out.finished and out.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"a profile request failed: {out.error or out.finish_reason}")
                if out.new_token_ids:
                    now = time.monotonic()
                    if ttft is None:
                        ttft = now - sent
                    else:
                        gaps.append(now - last)
                    last = now
            return ttft, gaps

        # unmeasured, one wave per level: a switch captures only the live batch's decode graphs and a step
        # captures its own batch size's on first use, which would land in the measured levels
        self.progress = f"{name}: warm-up"
        for concurrency in request.concurrency:
            await asyncio.gather(*(one() for _ in range(concurrency)))
        points = []
        for concurrency in request.concurrency:
            self.progress = f"{name}: concurrency {concurrency}"
            total = max(request.requests, 2 * concurrency)
            left = itertools.count()
            results: list[tuple[float | None, list[float]]] = []

            async def loop() -> None:
                while next(left) < total:
                    results.append(await one())
            begin = time.monotonic()
            await asyncio.gather(*(loop() for _ in range(concurrency)))
            # a loop past saturation serves no more than the one before it, only slower
            rate = max(total / (time.monotonic() - begin), points[-1].rate if points else 0.0)
            ttft = percentile([t for t, _ in results if t is not None], 0.9) or 0.0
            # per request, as the policy observes it (window.Observation.itl_p90)
            itl = percentile([sum(gaps) / len(gaps) for _, gaps in results if gaps], 0.9) or 0.0
            points.append(ProfilePoint(rate, ttft, itl, total, "sweep"))
            log.info("profile %s: concurrency %d → %.2f requests/s, TTFT p90 %.3f s, ITL p90 %.4f s",
                     name, concurrency, rate, ttft, itl)
        return TopologyProfile(name, max(p.rate for p in points), points)
