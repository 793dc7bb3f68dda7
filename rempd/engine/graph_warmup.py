"""When the workers capture their decode CUDA graphs: every bucket after an install, at a switch's commit only the
buckets the running sequences will use next (the rest while the engine is idle, engine/graph_backfill.py, or on
first use, see worker_pool/cuda_graphs.py); and, once at start-up, compile the kernels those graphs and eager
steps launch under every TP size, so that no capture does."""
from __future__ import annotations

import logging

from rempd.topology import valid_topologies
from rempd.worker_pool.cuda_graphs import bucket_of, buckets_up_to
from rempd.worker_pool.kernel_warmup import WarmupShape

log = logging.getLogger("rempd.engine")


def stage_max_len(engine) -> int:
    """The context length the stages are built for (their rotary tables; the graphs' block-table width)."""
    cfg = engine.model_config
    return min(engine.config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


def warm_kernels(engine) -> None:
    """Every worker compiles the kernels of every TP size the daemon's devices allow: a worker may serve any of
    them after a switch (worker_pool/kernel_warmup.py). Seconds of the slowest in engine.kernel_warm_seconds."""
    cfg, config = engine.model_config, engine.config
    topologies = valid_topologies(len(engine.devices), cfg.num_heads, cfg.num_kv_heads, cfg.num_layers)
    tp_sizes = sorted({t.tp for t in topologies})
    shape = WarmupShape(config.block_size, stage_max_len(engine), config.max_num_seqs)
    engine.kernel_warm_seconds = max(engine.pool.call("warm_kernels", tp_sizes, shape))
    if engine.kernel_warm_seconds:
        log.info("kernels of TP sizes %s compiled in %.3f s", tp_sizes, engine.kernel_warm_seconds)


def capture_graphs(engine, batch_sizes: list[int] | None = None, refresh_info: bool = True) -> float:
    """Capture the decode graphs of the installed placement for these batch sizes (every bucket when None: then
    nothing is left to backfill), and refresh the workers' info unless told not to. Seconds of the slowest worker."""
    seconds = 0.0
    if engine.config.cuda_graphs and not engine.config.is_cpu:
        seconds = max(engine.pool.call("capture_graphs", engine.config.max_num_seqs, batch_sizes,
                                       workers=engine.active))
    if batch_sizes is None:
        engine.graph_backfill.after_install()
    if refresh_info:
        engine.shard_infos = engine.pool.call("info")
    return seconds


def capture_live_graphs(engine) -> float:
    """At a switch's commit: the graphs of the batch that runs next; the placement is the new one."""
    sizes = live_batch_sizes(engine, engine.placement.topology.pp)
    seconds = capture_graphs(engine, sizes)
    engine.graph_backfill.after_commit(engine.config.max_num_seqs, sizes)
    return seconds


def backfill_graph(engine) -> int | None:
    """While the engine is idle: capture the smallest bucket the last commit left out; that bucket, or None when
    none is left. A bucket a step captured meanwhile costs a call the workers skip (DecodeGraphs.capture). The
    workers' info is not refreshed: nothing the engine reads of it changes with a capture, and a request arriving
    meanwhile should wait for the capture alone."""
    size = engine.graph_backfill.next_bucket()
    if size is not None:
        capture_graphs(engine, [size], refresh_info=False)
        engine.graph_backfill.captured(size)
    return size


def live_batch_sizes(engine, pp: int) -> list[int]:
    """The decode batch sizes the running sequences make under `pp` stages: micro-batches of an even share
    (see LLMEngine.step)."""
    return batch_sizes(len(engine.scheduler.running), pp)


def batch_sizes(n: int, pp: int) -> list[int]:
    share = -(-n // pp) if n else 0
    return [min(share, n - start) for start in range(0, n, share)] if n else []


def expected_batch_sizes(engine, pp: int) -> list[int]:
    """The live batch sizes, and those once the waiting requests join it, one per graph bucket, largest first (as
    DecodeGraphs.capture orders them, so that smaller ones fit in the larger's memory): a staged switch captures
    them all before its cut, so that requests waiting at that time, which join the batch after it, do not make the
    first steps after the cut capture (a capture holds every step of the stage: 30-70 ms each on 4x H100, 7B)."""
    sizes = live_batch_sizes(engine, pp)
    joined = min(len(engine.scheduler.running) + len(engine.scheduler.waiting), engine.config.max_num_seqs)
    buckets = buckets_up_to(engine.config.max_num_seqs)
    by_bucket = {bucket_of(n, buckets): n for n in [*batch_sizes(joined, pp), *sizes]}
    return sorted(by_bucket.values(), reverse=True)


def live_buckets(engine, pp: int) -> int:
    """How many graphs a commit under `pp` stages captures, for plan's price (distinct batch sizes)."""
    return len(set(live_batch_sizes(engine, pp)))
