"""What a worker process is told at spawn: its place in the world group, its device, the model and its budgets."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rempd.model.config import ModelConfig

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
    step_channel: str = ""  # shared-memory ring the driver writes steps to (see StepChannel)
    attention: str = "auto"  # "auto", "triton" or "reference" (see step_runner.use_kernels)
