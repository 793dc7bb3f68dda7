"""How an engine is built: the model, the topology, the devices and the memory it may use."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model_dir: str
    tp: int = 1
    pp: int = 1
    devices: list[int] = field(default_factory=list)  # CUDA device ids; empty means CPU workers
    cpu_workers: int = 0
    dtype: str | None = None  # None: the checkpoint's own
    block_size: int = 16
    kv_cache_memory: int = 64 << 20  # bytes per worker for the KV pool on CPU
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # token budget of one step (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # how a switch runs unless its request says: stop_the_world | staged (on GPUs its cut is still longer than a
    # whole stop-the-world switch: BENCHMARKS.md)
    switch_mode: str = "stop_the_world"
    staging_memory: int | None = None  # bytes per worker a staged switch may use; None: see StagingOptions
    staging_chunk_bytes: int | None = None  # most bytes a worker moves between two steps while staging
    worker_timeout: float = 60.0  # seconds a worker may take to answer before it counts as hung
    store_name: str | None = None  # shared-memory segment name; None picks a fresh one
    switch_round_bytes: int = 1 << 30  # peer transfers of a switch go in rounds of about this size
    # a switch builds the new shards layer by layer, freeing old layers as it goes: "auto" (only when old and new
    # shards do not fit side by side), "always" or "never" (migrate/layer_steps.py)
    switch_in_place: str = "auto"
    attention: str = "auto"  # "auto": Triton kernels on CUDA, the reference elsewhere; or "triton" / "reference"
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA with the kernels only)
    # the next decode step is sent before this one's tokens reach the host: the workers feed the sampled tokens
    # back on the device (engine/scheduler.py "run ahead"; at pp > 1 the last stage sends them to the first,
    # worker_pool/token_feedback.py), so the GPU does not wait on the host
    # (1× H100, llama2-7b: batch 1 6.11 → 5.72 ms a step, batch 64 14.48 → 12.95; BENCHMARKS.md)
    async_tokens: bool = True

    @property
    def num_devices(self) -> int:
        return len(self.devices) if self.devices else self.cpu_workers

    @property
    def is_cpu(self) -> bool:
        return not self.devices
