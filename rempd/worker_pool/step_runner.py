"""How a worker runs its stage on one step: a captured decode graph when one fits, else eagerly with the Triton
kernels (GPU) or the reference attention (CPU, and the oracle). Logs the host time of each step."""
from __future__ import annotations

import math
import time

import torch

from rempd.engine.step_input import StepInput
from rempd.engine.step_log import StepLog
from rempd.model.attention import AttentionMetadata
from rempd.model.llama import LlamaStage
from rempd.model.paged_attention import kernels_available
from rempd.worker_pool.cuda_graphs import DecodeGraphs
from rempd.worker_pool.pending_tokens import feed_back
from rempd.worker_pool.step_profile import StepProfile
from rempd.worker_pool.step_tensors import to_device


def use_kernels(attention: str, device: torch.device) -> bool:
    """attention: "auto" (kernels on CUDA when Triton is there), "triton" or "reference"."""
    if attention == "auto":
        return device.type == "cuda" and kernels_available()
    return attention == "triton"


class StepRunner:
    def __init__(self, device: torch.device, kernels: bool):
        self.device, self.kernels = device, kernels
        self.graphs: DecodeGraphs | None = None
        self.staged_graphs: DecodeGraphs | None = None  # a staged switch's next stage, over the pool it keeps
        self.warmed_shapes: set[tuple] = set()  # decode shapes run once already: their capture needs no warm-up
        self.steps = self.graph_steps = 0
        # per step: received (execute called), unpacked (step in hand), launched (stage launched, without waiting
        # on the GPU or peers), done (output ready to send back)
        self.log = StepLog(("received", "unpacked", "launched", "done"), ("seqs", "tokens", "graph", "gpu_ms"))
        self.profile: StepProfile | None = None
        self.launched, self.replayed = 0.0, False

    def forward(self, stage: LlamaStage, kv: torch.Tensor, step: StepInput, hidden: torch.Tensor | None,
                fed: torch.Tensor | None = None, graphs: bool = True) -> tuple[torch.Tensor, bool]:
        """hidden: the previous stage's output on later stages. fed: on the first stage, the sampled tokens that
        the step's token ids -k-1 stand for (async tokens, TokenFeedback.resolve). Returns hidden states or the
        sampled rows' logits, and whether a graph produced them (then they are a view of its static output)."""
        bucket = self.graphs.bucket_for(step) if graphs and self.graphs is not None else None
        if self.profile is not None:
            self.profile.before(graph=bucket is not None)
        if bucket is not None:
            out = self.graphs.run(bucket, step, hidden, fed)
            self.graph_steps += 1
        else:
            if self.kernels:
                ids, positions, samples, meta = to_device(step, self.device)
            else:
                meta = AttentionMetadata.build(step.slot_mapping, step.block_tables, step.query_lens,
                                               step.context_lens, kv.shape[3], self.device)
                ids, positions, samples = (torch.tensor(x, dtype=torch.long, device=self.device)
                                           for x in (step.token_ids, step.positions, step.sample_indices))
            if fed is not None:
                feed_back(ids, fed)
            out = stage(ids if stage.is_first else hidden, positions, kv, meta, samples)
        if self.profile is not None:
            self.profile.after()
        self.steps += 1
        self.launched, self.replayed = time.perf_counter(), bucket is not None
        return out, bucket is not None

    def finished(self, received: float, unpacked: float, step: StepInput, waited: bool = True) -> None:
        """A step driven through the step channel is done: log its stamps. `waited`: false when the host did not
        wait for its device work (its tokens still on their way, or none come back here): then "done" is when it
        was launched."""
        gpu_ms = math.nan
        if self.profile is not None:
            gpu_ms = self.profile.finished(self.replayed, None if waited else len(self.log.rows))
        self.log.add(received, unpacked, self.launched, time.perf_counter(), len(step.query_lens), step.num_tokens,
                     self.replayed, gpu_ms)

    def profile_command(self, action: str, trace_after: int = 0, trace_steps: int = 0) -> dict | None:
        """"start": clear the log, time each step's device work, and trace the kernels of `trace_steps` graph
        steps after the first `trace_after`. "stop": the log since, and the kernel table, if any."""
        if action == "start":
            self.log.clear()
            self.profile = StepProfile(self.device, trace_after, trace_steps)
            return None
        kernels = None
        if self.profile is not None:
            for row, ms in self.profile.unread_spans().items():
                if row < len(self.log.rows):
                    self.log.rows[row] = (*self.log.rows[row][:-1], ms)  # gpu_ms is the row's last value
            kernels = self.profile.close()
        self.profile = None
        return {"steps": self.log.to_dicts(), "kernels": kernels}

    def capture(self, stage: LlamaStage, kv: torch.Tensor, hidden_size: int, max_blocks: int,
                max_batch: int, batch_sizes: list[int] | None = None, staged: bool = False) -> float:
        """Capture the decode graphs of this stage and pool: the buckets of `batch_sizes` now (all when None),
        the others on first use. `staged`: for a staged switch's next stage, kept apart until that stage is
        installed. Graphs already captured for this very stage and pool are kept. Seconds taken."""
        if self.device.type != "cuda" or not self.kernels:
            return 0.0
        graphs = next((g for g in (self.graphs, self.staged_graphs)
                       if g is not None and g.stage is stage and g.kv is kv), None)
        if graphs is None:
            graphs = DecodeGraphs(stage, kv, hidden_size, kv.dtype, max_blocks, max_batch, self.warmed_shapes)
        if staged:
            self.staged_graphs = graphs
        else:
            self.graphs, self.staged_graphs = graphs, None
        return graphs.capture(batch_sizes)

    def drop_graphs(self, staged: bool = False, serving: bool = True) -> None:
        """Before the stage or the KV pool goes away: a graph holds their addresses. `staged`: the next
        stage's too (the staged switch was given up); `serving`: the serving stage's."""
        if serving:
            self.graphs = None
        if staged:
            self.staged_graphs = None

    def info(self) -> dict:
        seconds = self.graphs.capture_seconds if self.graphs is not None else {}
        return {"graph_capture_s": sum(seconds.values()), "graph_capture_by_batch": dict(seconds),
                "graph_lazy_captures": self.graphs.lazy_captures if self.graphs is not None else 0,
                "kernels": self.kernels, "steps": self.steps, "graph_steps": self.graph_steps,
                # medians of the recent steps: a mean would carry the first steps' kernel compilation
                "host_ms_per_step": self.log.median_ms(("received", "launched")),
                "launch_to_reply_ms": self.log.median_ms(("launched", "done"))}
