"""The engine for asyncio callers: its loop runs on one thread, requests stream back through asyncio queues."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from rempd.engine.config import EngineConfig
from rempd.engine.graph_warmup import backfill_graph
from rempd.engine.llm_engine import LLMEngine
from rempd.engine.outputs import EngineStats, RequestOutput
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.switch_driver import SwitchDriver
from rempd.migrate.report import SwitchReport
from rempd.migrate.phase_clock import Fault
from rempd.topology import Placement, Topology
from rempd.worker_pool.pool import WorkerError

log = logging.getLogger("rempd.engine")
IDLE_WAIT_S = 0.1  # how long an idle engine waits for a command before looking after its workers
PLAN_POLL_S = 0.001  # how often an idle engine looks for the workers' answer to a dry run


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.loop = loop
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.is_recovering = False
        self.is_failed = False  # recovery itself failed: the daemon must exit
        self.stopping = threading.Event()
        self.ids = itertools.count()
        self.switch_driver = SwitchDriver(engine, self._emit, self._recover)
        self.last_ping = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="remp-engine", daemon=True)
        self.thread.start()

    @classmethod
    async def create(cls, config: EngineConfig, on_progress: Callable[[str, float], None] | None = None,
                     model_name: str | None = None) -> "AsyncEngine":
        engine = await asyncio.to_thread(LLMEngine, config, on_progress)
        return cls(engine, model_name or Path(config.model_dir).name, asyncio.get_running_loop())

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_healthy(self) -> bool:
        return not (self.is_recovering or self.is_failed) and all(self.engine.pool.alive())

    def check(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds "
                             f"{self.max_model_len} with at least one generated")

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        self.check(prompt_token_ids)
        request_id = f"{request_id}-{next(self.ids)}"  # ids from clients may repeat
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.streams[request_id] = stream
        self.commands.put(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.commands.put(("abort", request_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        if outputs:  # one wake-up of the event loop per step, not one per request
            self.loop.call_soon_threadsafe(self._deliver, outputs)

    def _apply(self, command: tuple) -> None:
        kind, request_id, *args = command
        if kind == "call":  # request_id holds the function, args[0] the future
            self._call(request_id, args[0])
            return
        if kind == "plan":  # request_id holds the target
            self.switch_driver.start_plan(request_id, args[0])
            return
        if kind == "abort":
            self.engine.abort_request(request_id)
            return
        try:
            self.engine.add_request(request_id, *args)
        except ValueError as exc:
            self._emit([RequestOutput(request_id, [], "", True, "error", len(args[0]), 0, error=str(exc))])

    def _call(self, fn: Callable[[], object], future: concurrent.futures.Future) -> None:
        try:
            # pp micro-batches may still be in flight between steps: their replies must be read before any
            # other call to the workers
            self._emit(self.engine.quiesce())
            future.set_result(fn())
        except WorkerError as exc:
            future.set_exception(exc)
            self._recover(str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - the caller gets it
            future.set_exception(exc)

    async def on_engine_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine's thread between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    async def plan(self, target: Topology | Placement) -> dict:
        """A dry run: the placement, the bytes per source and the predicted phase times, or SwitchRefused. Steps
        go on meanwhile (unlike on_engine_thread, it drains none)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("plan", target, future))
        return await asyncio.wrap_future(future)

    def running_switch(self) -> SwitchReport | None:
        return self.switch_driver.running()

    def start_switch(self, target: Topology | Placement, fault: Fault | None = None,
                     mode: str | None = None) -> tuple[SwitchReport, asyncio.Future]:
        """Begin a switch, staged or stop-the-world (None: the engine's default); returns its report, updated
        live, and a future that resolves when it ends. Raises SwitchInProgress while another one runs."""
        report = self.switch_driver.new_report(target)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def failed_to_start(started: asyncio.Future) -> None:
            if not started.cancelled() and started.exception() is not None and not done.done():
                done.set_exception(started.exception())

        run = functools.partial(self.switch_driver.run, target, report, fault, mode, done)
        asyncio.ensure_future(self.on_engine_thread(run)).add_done_callback(failed_to_start)
        return report, asyncio.wrap_future(done)

    def _run(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            try:
                timeout = None if engine.has_unfinished() or self.switch_driver.staging else \
                    PLAN_POLL_S if self.switch_driver.plans else \
                    0.0 if engine.graph_backfill.pending else IDLE_WAIT_S  # no wait between two backfills
                while True:
                    self._apply(self.commands.get(block=timeout is not None, timeout=timeout))
                    timeout = None
            except queue.Empty:
                pass
            if self.switch_driver.staging is not None:
                self.switch_driver.advance()
            if self.switch_driver.plans:
                self.switch_driver.advance_plans()
            if not engine.has_unfinished():
                # idle: nothing would touch a dead worker, so look for one (at most every 0.1 s)
                dead = [i for i, alive in enumerate(engine.pool.alive()) if not alive]
                if dead:
                    log.error("worker %s died while idle", dead)
                    self._recover(f"worker {dead[0]} died while idle")
                elif time.monotonic() - self.last_ping > engine.config.worker_timeout / 2:
                    self._ping()  # a stopped worker is alive: only an answer shows it can work
                elif not (self.switch_driver.staging or self.switch_driver.plans):
                    self._backfill()
                continue
            try:
                self._emit(engine.step())
            except WorkerError as exc:
                log.error("worker failure: %s", exc)
                self._recover(str(exc).splitlines()[0])

    def _ping(self) -> None:
        self.last_ping = time.monotonic()
        try:
            self.engine.pool.call("info", timeout=self.engine.config.worker_timeout)
        except WorkerError as exc:
            log.error("idle worker check failed: %s", exc)
            self._recover(str(exc).splitlines()[0])

    def _backfill(self) -> None:
        try:
            backfill_graph(self.engine)  # one bucket a turn: a request arriving meanwhile waits for one capture
        except WorkerError as exc:
            log.error("idle graph capture failed: %s", exc)
            self._recover(str(exc).splitlines()[0])

    def _recover(self, reason: str = "a worker failure") -> None:
        """Respawn the workers and rebuild the topology. Running requests keep what they streamed and recompute
        their KV on the rebuilt workers (the sampler gives the same tokens again); only if recovery fails do
        they end, with an error."""
        # respawned workers hold nothing of what was staged
        self.switch_driver.abandon("a worker failed while staging; the old topology was rebuilt")
        self.is_recovering = True
        try:
            self.engine.recover(reason)
        except Exception:
            log.exception("could not recover the worker pool")
            self._emit(self.engine.fail_all(f"request failed: {reason}; the workers could not be restarted"))
            self.is_failed = True
            self.stopping.set()
        finally:
            self.is_recovering = False

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def status(self) -> dict:
        return self.engine.status()

    async def shutdown(self) -> None:
        self.stopping.set()
        await asyncio.to_thread(self.thread.join)
        await asyncio.to_thread(self.engine.close)
