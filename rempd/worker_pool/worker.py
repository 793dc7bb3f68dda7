"""A worker process: one per device, spawned once, serving whichever shard the driver gives it."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rempd.engine.kv_cache import KVShape, kv_budget_bytes
from rempd.engine.sampler import sample, sample_on_device
from rempd.engine.step_input import StepInput
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.reshard import switch_shard
from rempd.migrate.stage_shard import ShardStaging
from rempd.migrate.stage_step import stage_step
from rempd.migrate.shards import ModelGeometry, Shard, shard_of
from rempd.model.llama import LlamaStage
from rempd.shm_store.store import WeightStore
from rempd.topology import Placement, kv_heads_per_rank
from rempd.worker_pool import device_memory, links
from rempd.worker_pool.groups import GroupCache
from rempd.worker_pool.kernel_warmup import WarmupShape, warm_kernels
from rempd.worker_pool.pending_tokens import PendingTokens, tokens_to_host
from rempd.worker_pool.pipeline_handoff import PipelineHandoff
from rempd.worker_pool.stage_builder import build_stage
from rempd.worker_pool.step_channel import StepChannel
from rempd.worker_pool.step_runner import StepRunner, use_kernels
from rempd.worker_pool.worker_setup import DTYPES, WorkerSetup


@dataclass
class ShardInfo:
    weight_bytes: int
    kv_bytes_per_block: int
    kv_capacity_blocks: int


class Worker:
    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.device = torch.device(setup.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{setup.master_port}",
                                rank=setup.index, world_size=setup.world_size, timeout=timedelta(seconds=120))
        self.world = dist.group.WORLD
        self.store = WeightStore.attach(setup.store_name)
        self.geometry = ModelGeometry(setup.model, setup.dtype)
        self.pinned = self._pin_store()
        self.dtype = DTYPES[setup.dtype]
        self.groups = GroupCache()
        self.placement: Placement | None = None
        self.stage: LlamaStage | None = None
        self.kv: torch.Tensor | None = None
        self.kv_buffer: torch.Tensor | None = None  # the pool's raw bytes: a switch may view them in a new shape
        self.kv_shape: KVShape | None = None
        self.handoff = PipelineHandoff(self.world, self.device, setup.world_size)
        self.channel = StepChannel.attach(setup.step_channel) if setup.step_channel else None
        self.runner = StepRunner(self.device, use_kernels(setup.attention, self.device))
        self.staging: ShardStaging | None = None  # the target shard of a staged switch, built beside this one
        self.last_switch: dict | None = None

    def _pin_store(self) -> bool:
        """Page-lock the weight store once, so host loads in a switch run at full PCIe speed.

        The mapping is read-only, which cudaHostRegister accepts only with its read-only flag."""
        if self.device.type != "cuda":
            return False
        buffer = self.store.buffer()
        read_only = 8  # cudaHostRegisterReadOnly
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), read_only)
        return int(error) == 0

    def row_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.store.entry(name).shape[1:])

    def fill_from_host(self, name: str, rows: tuple[int, int], out: torch.Tensor) -> None:
        out.copy_(self.store.rows(name, *rows), non_blocking=self.pinned)

    def load_shard(self, placement: Placement, block_size: int, max_len: int) -> ShardInfo | None:
        """Build this worker's stage of `placement` from the weight store; standby workers hold nothing."""
        self.release()
        self.placement = placement
        shard = shard_of(self.setup.model, placement, self.setup.index)
        if shard is None:
            return None
        self.stage = build_stage(self, placement, shard, self.fill_from_host, max_len)
        weight_bytes = self.stage.weight_bytes()
        self.kv_shape = self.kv_shape_for(shard, block_size)
        budget = kv_budget_bytes(self.device, self.setup.kv_cache_memory, self.setup.gpu_memory_utilization,
                                 reserve_bytes=device_memory.RESERVE_BYTES)
        per_block = self.kv_shape.bytes_per_block
        return ShardInfo(weight_bytes, per_block, budget // per_block)

    def allocate_kv(self, num_blocks: int) -> None:
        if self.kv_shape is not None:
            self.kv = self.new_pool(self.kv_shape, num_blocks)
            self._sync()

    def release(self) -> None:
        self.handoff.clear()
        if self.staging is not None:  # a staged switch rolled back in its cut: its chunk in flight ends first
            self.staging, staging = None, self.staging
            staging.abort()
        self.runner.drop_graphs(staged=True)
        self.stage = self.kv = self.kv_shape = self.kv_buffer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute_shared(self, ref: tuple[int, int] | bytes) -> list[int] | PendingTokens | None:
        """execute() of a step the driver wrote to the shared-memory channel; the step's times go to the log."""
        received = time.perf_counter()
        step = self.channel.read(ref)
        unpacked = time.perf_counter()
        tokens = self.execute(step)
        # the host waited for the step's device work only where it brought tokens back: a TP rank > 0, a stage
        # before the last or async tokens would stall on reading a profile's events now
        self.runner.finished(received, unpacked, step, waited=isinstance(tokens, list))
        return tokens

    def profile(self, action: str, *args: int) -> dict | None:
        return self.runner.profile_command(action, *args)

    def execute(self, step: StepInput, return_logits: bool = False
                ) -> list[int] | PendingTokens | torch.Tensor | None:
        if self.stage is None:
            return None
        stage, placement, me = self.stage, self.placement, self.setup.index
        hidden = fed = None
        if stage.is_first:  # the tokens this step reads that are not on the host yet (async tokens)
            step, fed = self.handoff.feedback.resolve(step)
        else:
            hidden = self.handoff.receive(step, placement, me, self.setup.model.hidden_size, self.dtype)
        # scoring checks the model itself, so it never replays a graph
        out, replayed = self.runner.forward(stage, self.kv, step, hidden, fed, graphs=not return_logits)
        if not stage.is_last:
            # a graph's static output is overwritten by the next replay, maybe while this send still runs
            self.handoff.send(step, out.clone() if replayed else out, placement, me)
            return None
        tp_rank = placement.coords(me)[1]
        if step.feedback and step.samples:
            # every rank samples (the logits are gathered: all draw the same tokens); the first stage's worker of
            # this TP rank keeps them on the device for the steps already sent that embed them (PipelineHandoff)
            tokens = sample_on_device(out, step.samples)
            self.handoff.sampled(step, tokens, placement, me)
            return tokens_to_host(tokens) if tp_rank == 0 else None
        if tp_rank != 0:
            return None
        if return_logits:
            return out.cpu().numpy()  # torch tensors would travel as shared-memory handles
        return sample(out, step.samples) if step.samples else None

    def kv_shape_for(self, shard: Shard, block_size: int) -> KVShape:
        cfg = self.setup.model
        return KVShape(len(shard.layers), block_size, kv_heads_per_rank(cfg.num_kv_heads, shard.tp), cfg.head_dim,
                       self.dtype)

    def new_pool(self, shape: KVShape, num_blocks: int) -> torch.Tensor:
        self.kv_buffer = shape.allocate(num_blocks, self.device)
        return shape.view(self.kv_buffer, num_blocks)

    def resize_pool(self, num_blocks: int, live_ids: list[int]) -> int:
        """A pool of up to `num_blocks` for this one, holding its blocks live_ids at ids 0..n-1 (engine/kv_resize.py):
        the blocks it holds. The old pool goes back to the device first: only the live blocks are held twice."""
        if self.kv is None:
            return num_blocks
        self.runner.drop_graphs()  # they hold the old pool's address, and would keep it alive
        live = self.kv[:, :, torch.tensor(live_ids, dtype=torch.long, device=self.device)]
        self.kv = self.kv_buffer = None
        self.kv_buffer, self.kv = self.kv_shape.allocate_holding(num_blocks, live)
        self._sync()
        return self.kv.shape[2]

    def drop_pool(self) -> None:
        self.kv = self.kv_buffer = None

    def switch_budget(self, plan: SwitchPlan, block_size: int, round_bytes: int,
                      growth_blocks: int) -> device_memory.SwitchBudget:
        return device_memory.switch_budget(self, plan, block_size, round_bytes, growth_blocks)

    def capture_graphs(self, max_batch: int, batch_sizes: list[int] | None = None, stage=None,
                       kv: torch.Tensor | None = None) -> float:
        """Capture decode graphs for the current shard and KV pool (after install and after a switch; every
        active worker calls this together, since TP all-reduces are captured): the buckets of `batch_sizes`, or
        all when None. A staged switch passes its next stage and pool. Seconds taken; 0 off CUDA."""
        staged = stage is not None
        stage, kv = (stage, kv) if staged else (self.stage, self.kv)
        if stage is None or kv is None:
            return 0.0
        max_blocks = -(-stage.rotary.cos.shape[0] // kv.shape[3])  # kv: [layers, 2, blocks, block_size, ...]
        return self.runner.capture(stage, kv, self.setup.model.hidden_size, max_blocks, max_batch, batch_sizes,
                                   staged)

    def warm_kernels(self, tp_sizes: list[int], shape: WarmupShape) -> float:
        return warm_kernels(self.setup.model, self.dtype, self.device, self.runner.kernels, tp_sizes, shape)

    def prepare_groups(self, placement: Placement) -> int:
        self.handoff.settle()
        return links.prepare_groups(self, placement)

    def warm_links(self, member_sets: list[tuple[int, ...]]) -> float:
        return links.warm_links(self, member_sets)

    def switch(self, plan: SwitchPlan, live_blocks: list[int], num_blocks: int, block_size: int,
               max_len: int, round_bytes: int, keep_pool: bool = True) -> dict:
        """This worker's part of the transform phase; see rempd.migrate.reshard."""
        self.runner.drop_graphs()  # they hold the old pool's addresses, and would keep it alive
        self.handoff.clear()  # no token transfer between stages may cross the switch's own transfers
        outside = device_memory.outside_allocator_bytes(self)
        self.stage, self.kv, self.kv_shape, report = switch_shard(self, plan, live_blocks, num_blocks, block_size,
                                                                  max_len, round_bytes, keep_pool)
        report["outside_growth_bytes"] = device_memory.outside_allocator_bytes(self) - outside
        self.placement = plan.new
        self.last_switch = report
        return report

    def last_switch_report(self) -> dict | None:
        """This worker's report of its last switch transform: seconds per step, bytes, in layer order the tensors
        built and freed in turn, and on CUDA what it held beyond its old shard at the peak, measured and as priced."""
        return self.last_switch

    def staged(self, op: str, *args) -> object:
        """One step of a staged switch, between serving steps; see rempd.migrate.stage_shard."""
        self.handoff.settle()  # its transfers never interleave with a token transfer between stages
        return stage_step(self, op, *args)

    def measure_links(self, size_bytes: int = 32 << 20) -> dict:
        return links.measure_links(self, size_bytes)

    def measure_all_reduce(self, numels: list[int], iterations: int = 20) -> dict[int, float]:
        return links.measure_all_reduce(self, numels, iterations)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wait_sends(self) -> None:
        self.handoff.wait_sends()

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": self.setup.device,
                "weight_bytes": self.stage.weight_bytes() if self.stage else 0,
                "kv_blocks": 0 if self.kv is None else self.kv.shape[2],
                "kv_bytes": 0 if self.kv is None else self.kv.numel() * self.kv.element_size(),
                "groups_built": len(self.groups.groups), "group_seconds": self.groups.build_seconds,
                **self.runner.info()}

    def shutdown(self) -> None:
        self.release()
        self.groups.destroy()
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.store.buffer().data_ptr())
        dist.destroy_process_group()
        self.store.close()
        if self.channel is not None:
            self.channel.close()
