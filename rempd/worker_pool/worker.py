"""A worker process: one per device, spawned once, serving whichever shard the driver gives it."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rempd.engine.kv_cache import KVShape, kv_budget_bytes
from rempd.engine.sampler import sample
from rempd.engine.step_input import StepInput
from rempd.model.attention import AttentionMetadata
from rempd.model.config import ModelConfig
from rempd.model.layers import TensorParallel
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.reshard import switch_shard
from rempd.migrate.stage_shard import ShardStaging, stage_step
from rempd.migrate.shards import ModelGeometry, shard_of
from rempd.model.llama import LlamaStage
from rempd.shm_store.store import WeightStore
from rempd.topology import Placement, kv_heads_per_rank, stage_layers
from rempd.worker_pool.groups import GroupCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class WorkerSetup:
    index: int  # rank in the world group, and index into the pool's devices
    world_size: int
    master_port: int
    device: str  # "cpu" or "cuda:N"
    store_name: str
    model: ModelConfig
    dtype: str
    kv_cache_memory: int  # CPU KV budget in bytes
    gpu_memory_utilization: float


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
        self.kv_shape: KVShape | None = None
        self.pending_sends: list[dist.Work] = []
        self.staging: ShardStaging | None = None  # the target shard of a staged switch, built beside this one

    def _pin_store(self) -> bool:
        """Page-lock the weight store once, so host loads in a switch run at full PCIe speed.

        The mapping is read-only, which cudaHostRegister accepts only with its read-only flag."""
        if self.device.type != "cuda":
            return False
        buffer = self.store.buffer()
        read_only = 8  # cudaHostRegisterReadOnly
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), read_only)
        return int(error) == 0

    def _fetch(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        return self.store.rows(name, *rows).to(self.device, self.dtype, copy=True)

    def load_shard(self, placement: Placement, block_size: int, max_len: int) -> ShardInfo | None:
        """Build this worker's stage of `placement` from the weight store; standby workers hold nothing."""
        self.release()
        self.placement = placement
        coords = placement.coords(self.setup.index)
        if coords is None:
            return None
        pp_rank, tp_rank = coords
        cfg, topo = self.setup.model, placement.topology
        members = placement.tp_group(pp_rank)
        tp = TensorParallel(topo.tp, tp_rank, self.groups.get(members), members)
        layers = stage_layers(cfg.num_layers, topo.pp)[pp_rank]
        self.stage = LlamaStage(cfg, layers, pp_rank == 0, pp_rank == topo.pp - 1, tp, self._fetch,
                                max_len, self.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in _tensors(self.stage))
        self.kv_shape = KVShape(len(layers), block_size, kv_heads_per_rank(cfg.num_kv_heads, topo.tp),
                                cfg.head_dim, self.dtype)
        budget = kv_budget_bytes(self.device, self.setup.kv_cache_memory, self.setup.gpu_memory_utilization,
                                 reserve_bytes=1 << 30)
        per_block = self.kv_shape.bytes_per_block
        return ShardInfo(weight_bytes, per_block, budget // per_block)

    def allocate_kv(self, num_blocks: int) -> None:
        if self.kv_shape is not None:
            self.kv = self.kv_shape.allocate(num_blocks, self.device)

    def release(self) -> None:
        self._wait_sends()
        self.stage = self.kv = self.kv_shape = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, step: StepInput, return_logits: bool = False) -> list[int] | torch.Tensor | None:
        if self.stage is None:
            return None
        stage, placement, dev = self.stage, self.placement, self.device
        pp_rank, tp_rank = placement.coords(self.setup.index)
        meta = AttentionMetadata.build(step.slot_mapping, step.block_tables, step.query_lens,
                                       step.context_lens, self.kv_shape.block_size, dev)
        positions = torch.tensor(step.positions, dtype=torch.long, device=dev)
        sample_indices = torch.tensor(step.sample_indices, dtype=torch.long, device=dev)
        if stage.is_first:
            inputs = torch.tensor(step.token_ids, dtype=torch.long, device=dev)
        else:
            inputs = torch.empty(step.num_tokens, self.setup.model.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(inputs, src=placement.worker(pp_rank - 1, tp_rank), group=self.world)
        out = stage(inputs, positions, self.kv, meta, sample_indices)
        if not stage.is_last:
            self._wait_sends()
            self.pending_sends.append(dist.isend(out, dst=placement.worker(pp_rank + 1, tp_rank), group=self.world))
            return None
        if tp_rank != 0:
            return None
        if return_logits:
            return out.cpu().numpy()  # torch tensors would travel as shared-memory handles
        return sample(out, step.samples) if step.samples else None

    def kv_capacity(self, placement: Placement, block_size: int) -> int | None:
        """KV blocks this worker could hold under `placement`, counting what a switch would free."""
        shard = shard_of(self.setup.model, placement, self.setup.index)
        if shard is None:
            return None
        cfg = self.setup.model
        shape = KVShape(len(shard.layers), block_size, kv_heads_per_rank(cfg.num_kv_heads, placement.topology.tp),
                        cfg.head_dim, self.dtype)
        budget = kv_budget_bytes(self.device, self.setup.kv_cache_memory, self.setup.gpu_memory_utilization,
                                 reserve_bytes=1 << 30)
        if self.device.type == "cuda":
            held = self.info()
            budget += held["kv_bytes"] + held["weight_bytes"] - self.geometry.weight_bytes(shard)
        return budget // shape.bytes_per_block

    def prepare_groups(self, placement: Placement) -> int:
        """Build the groups of `placement` that are not cached, and use each link once: NCCL sets up a
        communicator on its first use, which belongs to this phase, not to the first step after the switch.
        Every worker calls this together."""
        built = self.groups.build(placement)
        coords = placement.coords(self.setup.index)
        if coords is not None:
            pp_rank, tp_rank = coords
            token = torch.zeros(1, device=self.device)
            group = self.groups.get(placement.tp_group(pp_rank))
            if group is not None:
                dist.all_reduce(token, group=group)
            if pp_rank > 0:
                dist.recv(token, src=placement.worker(pp_rank - 1, tp_rank), group=self.world)
            if pp_rank < placement.topology.pp - 1:
                dist.send(token, dst=placement.worker(pp_rank + 1, tp_rank), group=self.world)
            self._sync()
        return built

    def switch(self, plan: SwitchPlan, live_blocks: list[int], num_blocks: int, block_size: int,
               max_len: int) -> dict:
        """This worker's part of the transform phase; see rempd.migrate.reshard."""
        self.stage, self.kv, self.kv_shape, times = switch_shard(self, plan, live_blocks, num_blocks, block_size,
                                                                 max_len)
        self.placement = plan.new
        return times

    def staged(self, op: str, *args) -> object:
        """One step of a staged switch, between serving steps; see rempd.migrate.stage_shard."""
        return stage_step(self, op, *args)

    def measure_links(self, size_bytes: int = 32 << 20) -> dict:
        """Seconds to move `size_bytes` host store → device, within the device, and to a peer. All workers call
        this together, which also makes every worker take part in the world group's first batched transfer,
        as NCCL requires."""
        src = self.store.buffer()[:size_bytes]
        dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
        timings = {}
        for name, action in (("host", lambda: dst.copy_(src)), ("local", lambda: dst.clone())):
            action()
            self._sync()
            start = time.perf_counter()
            action()
            self._sync()
            timings[name] = time.perf_counter() - start
        size, me = self.setup.world_size, self.setup.index
        if size > 1:  # a ring: every worker sends to the next and receives from the previous, all at once
            for _ in range(2):  # the first exchange also sets up the connections
                self._sync()
                start = time.perf_counter()
                ops = [dist.P2POp(dist.isend, dst, (me + 1) % size, self.world),
                       dist.P2POp(dist.irecv, torch.empty_like(dst), (me - 1) % size, self.world)]
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
                self._sync()
                timings["peer"] = time.perf_counter() - start
        return {"bytes": src.numel(), **timings}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wait_sends(self) -> None:
        for work in self.pending_sends:
            work.wait()
        self.pending_sends.clear()

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": self.setup.device,
                "weight_bytes": sum(t.numel() * t.element_size() for t in _tensors(self.stage)) if self.stage else 0,
                "kv_blocks": 0 if self.kv is None else self.kv.shape[2],
                "kv_bytes": 0 if self.kv is None else self.kv.numel() * self.kv.element_size(),
                "groups_built": len(self.groups.groups), "group_seconds": self.groups.build_seconds}

    def shutdown(self) -> None:
        self.release()
        self.groups.destroy()
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.store.buffer().data_ptr())
        dist.destroy_process_group()
        self.store.close()


def _tensors(stage: LlamaStage) -> list[torch.Tensor]:
    seen, found = set(), []
    for obj in [stage, *stage.layers]:
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found
