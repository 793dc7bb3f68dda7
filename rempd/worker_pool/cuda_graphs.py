"""CUDA graphs of one worker's stage for decode steps, one per batch-size bucket (a step is padded to its bucket).

A graph bakes in the addresses of the weights and of the KV pool, so it is captured after every install and
every switch, and dropped before a switch frees the old pool. A switch captures only the buckets its live batch
uses (a staged one, before the cut, over the pool it will keep), so that capture does not lengthen the pause;
any other bucket is captured on its first step (every TP rank of a stage runs the same step, so they capture
together, as the all-reduce inside needs). Inputs live in static buffers: one int64 array in the StepLayout of
the bucket, plus the hidden states a later pipeline stage receives. TP all-reduces run inside the graph (NCCL
allows capture); pipeline send/recv stay outside it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rempd.engine.step_input import StepInput
from rempd.model.llama import LlamaStage
from rempd.worker_pool.pending_tokens import feed_back
from rempd.worker_pool.step_tensors import StepLayout

log = logging.getLogger("rempd.graphs")
CAPTURE_HEADROOM = 512 << 20  # free device memory below which the allocator's cache is emptied before a capture


def buckets_up_to(max_batch: int) -> list[int]:
    """Powers of two, and max_batch itself: decode is bound by weight reads, so padding a batch costs little."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def bucket_of(batch: int, buckets: list[int]) -> int:
    """The bucket that runs a batch of this size: the smallest that holds it (the largest past it)."""
    return next(b for b in buckets if b >= min(batch, buckets[-1]))


def idle_inputs(size: int, max_blocks: int, device: torch.device) -> tuple[StepLayout, torch.Tensor]:
    """A bucket's static inputs as captured: `size` padding rows (write nothing, read nothing), on the device."""
    layout = StepLayout(tokens=size, samples=size, seqs=size, max_blocks=max_blocks)
    idle = StepInput([0] * size, [0] * size, [-1] * size, [1] * size, [0] * size, [[]] * size, list(range(size)), [])
    return layout, torch.from_numpy(layout.pack(idle)).to(device)


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    layout: StepLayout
    flat: torch.Tensor  # static inputs, StepLayout order
    hidden: torch.Tensor | None  # static hidden states in, on stages after the first
    out: torch.Tensor  # static output: hidden states, or logits of every row on the last stage


class DecodeGraphs:
    def __init__(self, stage: LlamaStage, kv: torch.Tensor, hidden_size: int, dtype: torch.dtype,
                 max_blocks: int, max_batch: int, warmed: set[tuple] | None = None):
        """warmed: kernel shapes this worker has run before (kept across stages by its StepRunner)."""
        self.stage, self.kv, self.max_blocks = stage, kv, max_blocks
        self.warmed = set() if warmed is None else warmed
        self.hidden_size, self.dtype = hidden_size, dtype
        self.buckets = buckets_up_to(max_batch)
        self.graphs: dict[int, DecodeGraph] = {}
        self.capture_seconds: dict[int, float] = {}
        self.pool = torch.cuda.graph_pool_handle()  # shared by every bucket's graph
        self.lazy_captures = 0

    def capture(self, batch_sizes: list[int] | None = None) -> float:
        """Capture the buckets of these batch sizes (all of them when None) that are not captured yet, largest
        first so that the smaller ones fit in its memory pool. Seconds taken."""
        wanted = self.buckets if batch_sizes is None else {bucket_of(n, self.buckets) for n in batch_sizes if n > 0}
        return sum(self._capture(size) for size in sorted(set(wanted) - set(self.graphs), reverse=True))

    def _capture(self, size: int) -> float:
        start = time.perf_counter()
        self.graphs[size] = self._capture_one(size)
        torch.cuda.synchronize()
        self.capture_seconds[size] = time.perf_counter() - start
        log.info("captured decode graph for batch %d in %.3f s", size, self.capture_seconds[size])
        return self.capture_seconds[size]

    def _capture_one(self, size: int) -> DecodeGraph:
        device = self.kv.device
        layout, flat = idle_inputs(size, self.max_blocks, device)
        ids, positions, samples, meta = layout.unpack(flat, max_query_len=1)
        hidden = None if self.stage.is_first else torch.zeros(size, self.hidden_size, dtype=self.dtype,
                                                                device=device)
        inputs = ids if hidden is None else hidden
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # a warm-up run compiles kernels and sets up libraries outside capture; needed once per kernel shape:
        # the batch, the TP group (head counts, the all-reduce) and which ends of the model the stage holds
        shape = (size, tuple(self.stage.tp.members), self.stage.is_first, self.stage.is_last, self.max_blocks)
        graph = torch.cuda.CUDAGraph()
        if torch.cuda.mem_get_info(device)[0] < CAPTURE_HEADROOM:
            # a capture cannot return cached memory to the driver when it needs more: do it before
            torch.cuda.empty_cache()
        with torch.cuda.stream(side):
            if shape not in self.warmed:
                self.stage(inputs, positions, self.kv, meta, samples)
                self.warmed.add(shape)
            # not torch.cuda.graph(): it always empties the allocator's cache first, which after a switch means
            # returning the old shard's memory to the driver inside the pause
            graph.capture_begin(pool=self.pool)
            try:
                out = self.stage(inputs, positions, self.kv, meta, samples)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return DecodeGraph(graph, layout, flat, hidden, out)

    def bucket_for(self, step: StepInput) -> int | None:
        """The bucket that runs this step, or None when it is not a plain decode step that fits one."""
        n = len(step.query_lens)
        if step.num_tokens != n or n > self.buckets[-1] or step.sample_indices not in ([], list(range(n))):
            return None
        if max(len(t) for t in step.block_tables) > self.max_blocks:
            return None
        return bucket_of(n, self.buckets)

    def run(self, size: int, step: StepInput, hidden: torch.Tensor | None,
            last_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the bucket's graph on `step`; returns the rows of the real sequences (a view of the static
        output, valid until the next replay). `last_tokens`: the previous step's samples, for the step's
        negative token ids (StepInput.feedback)."""
        if size not in self.graphs:
            self._capture(size)
            self.lazy_captures += 1
        entry, n = self.graphs[size], len(step.query_lens)
        entry.flat.copy_(torch.from_numpy(entry.layout.pack(step)), non_blocking=True)
        if last_tokens is not None:
            feed_back(entry.flat[:n], last_tokens)
        if entry.hidden is not None:
            entry.hidden[:n].copy_(hidden)
        entry.graph.replay()
        return entry.out[:n]
