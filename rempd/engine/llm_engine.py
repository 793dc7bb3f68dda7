"""The engine loop: schedule → workers execute → postprocess, with pp micro-batches in flight."""
from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Callable

import torch

from rempd.engine.config import EngineConfig
from rempd.engine.detokenizer import IncrementalDetokenizer
from rempd.engine.graph_backfill import GraphBackfill
from rempd.engine.graph_warmup import warm_kernels
from rempd.engine.install import install_placement
from rempd.engine.links import calibrate, measure_links, warm_links
from rempd.engine.outputs import EngineStats, RequestOutput
from rempd.engine.recovery import DeviceSlots, RecoveryRecord, recover
from rempd.engine.request import Request
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.scheduler import ScheduledBatch
from rempd.engine.sequence import Sequence
from rempd.engine.status import engine_status
from rempd.engine.step_input import StepInput
from rempd.engine.step_log import StepLog
from rempd.migrate.predict import Price
from rempd.migrate.report import SwitchReport
from rempd.migrate.phase_clock import Fault
from rempd.migrate.transaction import SwitchTransaction
from rempd.model.checkpoint import Checkpoint
from rempd.model.tokenizer import Tokenizer
from rempd.shm_store.loader import load_into_store
from rempd.topology import Placement, Topology, check_topology
from rempd.worker_pool.pool import WorkerError, WorkerPool
from rempd.worker_pool.worker_setup import WorkerSetup

Progress = Callable[[str, float], None]


class LLMEngine:
    def __init__(self, config: EngineConfig, on_progress: Progress | None = None):
        progress = on_progress or (lambda message, fraction: None)
        self.config = config
        self.graph_backfill = GraphBackfill()  # install and every commit reset it
        checkpoint = Checkpoint(config.model_dir)
        checkpoint.validate()
        cfg = self.model_config = checkpoint.config
        topology = Topology(config.tp, config.pp)
        if config.num_devices < 1:
            raise ValueError("no devices: give CUDA device ids or a number of CPU workers")
        check_topology(topology, config.num_devices, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        progress("loading weights into shared memory", 0.0)
        self.store = load_into_store(checkpoint, name=config.store_name,
                                     on_progress=lambda done, total: progress("loading weights", done / total))
        try:
            self.devices = [f"cuda:{d}" for d in config.devices] or ["cpu"] * config.cpu_workers
            self.template = WorkerSetup(index=0, world_size=0, master_port=0, device="", store_name=self.store.name,
                                   model=cfg, dtype=config.dtype or cfg.dtype,
                                   kv_cache_memory=config.kv_cache_memory,
                                   gpu_memory_utilization=config.gpu_memory_utilization,
                                   attention=config.attention)
            progress("starting workers", 0.0)
            self.device_slots = DeviceSlots.of(self.devices)
            self.pool = WorkerPool(self.template, self.devices, reply_timeout=config.worker_timeout)
            progress("opening links", 0.0)
            warm_links(self)
            progress("compiling kernels", 0.0)
            warm_kernels(self)
            progress("building topology", 0.0)
            self.install(Placement.default(topology))
        except BaseException:
            self.store.unlink()
            raise
        self.recoveries: list[RecoveryRecord] = []
        self.links = measure_links(self)
        self.switches: list[SwitchReport] = []
        self.last_output_at = time.perf_counter()
        self.pause_report: SwitchReport | None = None  # a switch whose live requests have not produced again yet
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[ScheduledBatch] = deque()
        # outputs made by a quiesce that a worker failure cut short (each carries its token's text only once):
        # the next step or quiesce hands them out
        self.made: list[RequestOutput] = []
        # per batch: begin (its scheduling began), sent, replied (its tokens are in), done (its outputs are made)
        self.step_log = StepLog(("begin", "sent", "replied", "done"), ("seqs",))
        self.send_failure: WorkerError | None = None  # sending the next batch failed; the next step raises it
        calibrate(self)

    def install(self, placement: Placement) -> None:
        """Load every active worker's shard and size one KV pool for all (engine/install.py)."""
        install_placement(self, placement)

    @property
    def active(self) -> list[int]:
        return list(self.placement.workers)

    def preempt_all(self) -> None:
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context "
                             f"holds {self.max_model_len} with at least one generated")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id, list(prompt_token_ids), params, seed)
        self.requests[request_id] = Request(seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                                                        params.stop))
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests or self.in_flight or self.made)  # finished requests' batches may be in flight

    def step(self) -> list[RequestOutput]:
        self._raise_send_failure()
        self._fill()
        outputs = self.finish_oldest(refill=True) if self.in_flight else []
        if self.made:
            outputs, self.made = self.made + outputs, []
        if outputs:
            now = time.perf_counter()
            if self.pause_report is not None:  # the first tokens after a switch end its serving pause
                report = self.pause_report
                report.serving_pause_s = (report.give_back_pause_s or 0.0) + now - self.last_output_at
                self.pause_report = None
            self.last_output_at = now
        return outputs

    def _fill(self) -> None:
        """Schedule and send batches until pp are in flight, one more with async tokens: a step run ahead, whose
        tokens the last stage samples in a step still in flight (the workers hand them to the first stage)."""
        pp = self.placement.topology.pp
        self.scheduler.async_tokens = self.config.async_tokens
        # under pp the running sequences split into pp micro-batches, so that every stage has work
        share = -(-len(self.scheduler.running) // pp) if pp > 1 and self.scheduler.running else None
        while len(self.in_flight) < pp + self.scheduler.async_tokens:
            begin = time.perf_counter()
            batch = self.scheduler.schedule(share)
            if batch is None:
                break
            self.pool.send_step(self.scheduler.step_input(batch), workers=self.active)
            batch.sent_stamps = (begin, time.perf_counter())
            self.in_flight.append(batch)

    def finish_oldest(self, refill: bool = False) -> list[RequestOutput]:
        """Wait for the oldest batch's tokens and make its outputs. With `refill`, the next batches are scheduled
        and sent first, as soon as these tokens are recorded: detokenizing and the caller's handling of the
        outputs then run while the workers compute, instead of in series with them."""
        batch = self.in_flight.popleft()
        results = self.pool.collect(self.active)
        replied = time.perf_counter()
        tokens = results[self.active.index(self.placement.output_worker)] or []
        updated = self.scheduler.postprocess(batch, tokens)
        if refill:
            try:
                self._fill()
            except WorkerError as exc:  # raised by the next step, once these tokens have reached their requests
                self.send_failure = exc
        outputs = [self._output(seq) for seq in updated]
        self.step_log.add(*batch.sent_stamps, replied, time.perf_counter(), len(batch.seqs))
        return outputs

    def _raise_send_failure(self) -> None:
        if self.send_failure is not None:
            failure, self.send_failure = self.send_failure, None
            raise failure

    def quiesce(self) -> list[RequestOutput]:
        """Finish every micro-batch in flight; nothing new is scheduled until the caller steps again."""
        self._raise_send_failure()
        while self.in_flight:
            self.made += self.finish_oldest()
        outputs, self.made = self.made, []
        if outputs:
            self.last_output_at = time.perf_counter()
        return outputs

    def _output(self, seq: Sequence) -> RequestOutput:
        output = self.requests[seq.request_id].output(self.scheduler)
        if seq.is_finished:
            del self.requests[seq.request_id]
        return output

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after a worker failure) and forget in-flight steps."""
        outputs = self.made + [request.fail(self.scheduler, message) for request in self.requests.values()]
        self.made = []
        self.requests.clear()
        self.in_flight.clear()
        self.send_failure = None
        return outputs

    def score(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits at every prompt position, [tokens, vocab]: for checking the model against a reference."""
        if self.has_unfinished():
            raise RuntimeError("score() runs only on an idle engine")
        seq = Sequence("score", list(prompt_token_ids), SamplingParams(), seed=0)
        blocks = self.scheduler.blocks
        blocks.grow(seq, seq.num_tokens)
        try:
            n, bs = seq.num_tokens, blocks.block_size
            step = StepInput(seq.token_ids, list(range(n)), [blocks.slot(seq, p) for p in range(n)], [n], [n],
                             [seq.block_table[:-(-n // bs)]], list(range(n)), [])
            results = self.pool.call("execute", step, True, workers=self.active)
            return torch.from_numpy(results[self.active.index(self.placement.output_worker)])
        finally:
            blocks.release(seq)

    def switch(self, target: Topology | Placement, report: SwitchReport, fault: Fault | None = None,
               on_phase: Callable[[SwitchReport], None] | None = None) -> list[RequestOutput]:
        """Run one reconfiguration transaction between steps; returns outputs finished while quiescing."""
        finished = self.quiesce()  # the plan phase calls the workers: no micro-batch may be in flight
        transaction = SwitchTransaction(self, target, report, self.links, fault, on_phase)
        transaction.outputs = finished
        if report not in self.switches:
            self.switches.append(report)
        transaction.run()
        if report.state == "committed":
            self.links.learn(Price(**report.priced), report.phases, report.transform_detail.get("graph_capture"))
        if transaction.outputs:
            self.last_output_at = time.perf_counter()
        if report.requests_live:
            self.pause_report = report
        return transaction.outputs

    def recover(self, reason: str = "a worker failure") -> RecoveryRecord:
        """Respawn the workers after one died or hung and rebuild from the weight store (not the disk), on a
        smaller topology if a device is gone (engine/recovery.py)."""
        return recover(self, reason)

    @property
    def num_recoveries(self) -> int:
        return sum(1 for r in self.recoveries if r.target)

    def status(self) -> dict:
        return engine_status(self)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), s.blocks.num_used, s.blocks.num_blocks, s.num_preempted)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            self.store.unlink()
