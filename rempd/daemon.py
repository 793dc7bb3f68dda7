"""rempd's lifecycle: bind sockets → start the engine (with progress) → serve → READY → drain on SIGTERM.

Both APIs run as uvicorn servers in this one asyncio loop. Signals are ours, not uvicorn's: each
uvicorn server would otherwise install its own handlers and re-raise the signal when it stops,
and the daemon would end "killed by SIGTERM" instead of draining and exiting 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any, Awaitable, Callable

import uvicorn

from rempd import systemd
from rempd.api.control import Lifecycle, create_control_app
from rempd.api.gate import Gate
from rempd.api.metrics import Metrics
from rempd.api.serving import create_serving_app
from rempd.api.unix_socket import PeerPolicy, SocketError, bind_control_socket, peer_checked_protocol
from rempd.config import DaemonConfig
from rempd.console import StartupProgress
from rempd.engine.config import EngineConfig
from rempd.gil import set_switch_interval

log = logging.getLogger("rempd")
EngineFactory = Callable[[EngineConfig, Callable[[str, float], None]], Awaitable[Any]]
MONITOR_INTERVAL_S = 1.0


class Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


async def create_engine(config: EngineConfig, on_progress: Callable[[str, float], None]) -> Any:
    from rempd.engine.async_engine import AsyncEngine  # torch loads here, not at import

    return await AsyncEngine.create(config, on_progress=on_progress)


class Daemon:
    def __init__(self, config: DaemonConfig, engine_factory: EngineFactory = create_engine):
        self.config = config
        self.engine_factory = engine_factory
        self.life = Lifecycle(model_name=config.model_name, on_switch=self.record_switch)
        self.gate = Gate()
        self.metrics = Metrics(config.model_name)
        self.exit_code = 0
        self.signals = 0
        self.stop = asyncio.Event()  # first SIGTERM/SIGINT, or an engine that cannot recover
        self.force = asyncio.Event()  # second signal: skip the rest of the drain
        self.serving: Server | None = None  # set once the serving API runs

    def on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            if self.life.state == "starting":
                log.info("%s: stopping once the engine has started (again to exit now)", name)
            else:
                log.info("%s: draining (at most %.0f s)", name, self.config.drain_timeout)
            self.stop.set()
        elif self.life.state == "starting":
            log.warning("%s again while starting: exiting now", name)
            os._exit(1)  # the engine is mid-load in a thread; systemd's cgroup kill takes the workers
        else:
            log.warning("%s again: aborting the running requests now", name)
            self.force.set()

    def record_switch(self, report: Any) -> None:
        """A finished switch (a migrate.report.SwitchReport) into remp:topology_switch_*."""
        result = "ok" if report.state == "committed" else report.state  # rolled_back | refused | failed
        cut = report.cut_seconds if report.state == "committed" else None
        self.metrics.record_switch(report.total_seconds, result, cut, report.mode)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            control_sock = bind_control_socket(self.config.socket, self.config.socket_group)
        except SocketError as exc:
            log.error("%s", exc)
            return 1
        try:
            tcp = bind_tcp(self.config.host, self.config.port)
        except OSError as exc:
            control_sock.remove()
            log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc.strerror or exc)
            return 1
        control = Server(uvicorn.Config(
            create_control_app(self.life), http=peer_checked_protocol(PeerPolicy.for_group(self.config.socket_group)),
            lifespan="off", log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
        control_task = asyncio.create_task(control.serve(sockets=[control_sock.sock]))
        log.info("control socket %s", self.config.socket)
        try:
            engine = await self.start_engine()
            if engine is not None:
                await self.serve(engine, tcp)
        finally:
            tcp.close()
            control.should_exit = True
            await control_task
            control_sock.remove()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("rempd stopped (exit %d)", self.exit_code)
        return self.exit_code

    async def start_engine(self) -> Any | None:
        # A daemon killed with -9 (or OOM-killed) leaves its weight store in /dev/shm, holding RAM until
        # reboot; its workers died with it (PDEATHSIG), so any segment whose owner is dead is garbage.
        from rempd.shm_store.segments import reclaim_stale_segments

        for name in reclaim_stale_segments():
            log.info("removed the stale weight store /dev/shm/%s of a dead rempd", name)
        with StartupProgress(self.life) as on_progress:
            try:
                engine = await self.engine_factory(self.config.engine_config(), on_progress)
            except Exception as exc:
                self.life.state = "failed"
                log.error("rempd could not start: %s", exc, exc_info=not isinstance(exc, (ValueError, OSError)))
                self.exit_code = 1
                return None
        self.life.engine = engine
        if self.stop.is_set():  # SIGTERM came while loading: nothing to drain
            await self.shutdown_engine(engine)
            return None
        return engine

    async def serve(self, engine: Any, tcp: socket.socket) -> None:
        model_name = self.config.served_model_name or engine.model_name
        self.life.model_name = self.metrics.model_name = model_name
        app = create_serving_app(engine, model_name=model_name, model_root=self.config.model or "",
                                 gate=self.gate, metrics=self.metrics, api_key=self.config.api_key,
                                 max_request_bytes=self.config.max_request_bytes)
        self.serving = Server(uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning",
                                             access_log=False, timeout_graceful_shutdown=3))
        serving_task = asyncio.create_task(self.serving.serve(sockets=[tcp]))
        while not self.serving.started and not serving_task.done():
            await asyncio.sleep(0.01)
        if serving_task.done():
            log.error("the serving API did not start: %s", serving_task.exception())
            self.exit_code = 1
            await self.shutdown_engine(engine)
            return
        host, port = tcp.getsockname()[:2]
        self.life.state = "serving"
        systemd.ready(self.summary(engine))
        log.info("serving %s on http://%s:%d", model_name, host, port)
        monitor = asyncio.create_task(self.monitor(engine))
        policy = asyncio.create_task(self.run_policy(engine))
        await self.stop.wait()
        monitor.cancel()
        policy.cancel()
        await self.drain()
        self.serving.should_exit = True
        await serving_task
        await self.shutdown_engine(engine)

    async def run_policy(self, engine: Any) -> None:
        """The topology policy (rempd/policy): observes always, switches on its own in `auto` mode."""
        from rempd.api.switching import launch_switch
        from rempd.policy.setup import has_policy_surface, make_runner

        if not has_policy_surface(engine):
            return
        runner = self.life.policy = make_runner(self.config, self.life.model_name or "")
        self.metrics.observations = runner.log
        self.metrics.sources.append(runner.families)
        await runner.run(engine, lambda eng, target: launch_switch(eng, target, self.record_switch))

    async def drain(self) -> None:
        if self.life.state != "failed":
            self.life.state = "draining"
        systemd.stopping(f"draining {self.gate.active} requests")
        timeout = 0.0 if self.exit_code else self.config.drain_timeout
        drained = asyncio.create_task(self.gate.drain(timeout))
        forced = asyncio.create_task(self.force.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        drained.cancel()
        if self.gate.active:
            log.warning("aborting %d requests still running after the drain", self.gate.active)
            await self.gate.abort_all()

    async def shutdown_engine(self, engine: Any) -> None:
        systemd.status("stopping the workers")
        try:
            await engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
            self.exit_code = self.exit_code or 1

    async def monitor(self, engine: Any) -> None:
        """Exit non-zero when the engine gives up, so that Restart=on-failure acts; keep STATUS= current."""
        last = ""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            if getattr(engine, "is_failed", False):
                log.error("the engine could not recover from a worker failure; exiting")
                self.life.state = "failed"
                self.exit_code = 1
                self.stop.set()
                return
            summary = self.summary(engine)
            if summary != last:
                systemd.status(summary)
                last = summary

    def summary(self, engine: Any) -> str:
        topology = engine.status().get("topology", {})
        stats = engine.stats()
        health = "" if engine.is_healthy else " (recovering a worker)"
        return (f"serving {self.life.model_name} TP{topology.get('tp')}PP{topology.get('pp')}: "
                f"{stats.num_running} running, {stats.num_waiting} waiting{health}")


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bound before the engine loads, so a taken port fails in a second, not after minutes of loading."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def run(config: DaemonConfig, engine_factory: EngineFactory = create_engine) -> int:
    """The process's exit code: 0 after a drain, 1 when start-up fails or the engine cannot recover."""
    set_switch_interval()
    return asyncio.run(Daemon(config, engine_factory).run())
