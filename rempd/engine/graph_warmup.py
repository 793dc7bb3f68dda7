"""When the workers capture their decode CUDA graphs: every bucket after an install, at a switch's commit only the
buckets the running sequences will use next (the rest on first use, see worker_pool/cuda_graphs.py)."""
from __future__ import annotations


def capture_graphs(engine, batch_sizes: list[int] | None = None) -> float:
    """Capture the decode graphs of the installed placement for these batch sizes (every bucket when None), and
    refresh the workers' info. Seconds of the slowest worker."""
    seconds = 0.0
    if engine.config.cuda_graphs and not engine.config.is_cpu:
        seconds = max(engine.pool.call("capture_graphs", engine.config.max_num_seqs, batch_sizes,
                                       workers=engine.active))
    engine.shard_infos = engine.pool.call("info")
    return seconds


def capture_live_graphs(engine) -> float:
    """At a switch's commit: the graphs of the batch that runs next; the placement is the new one."""
    return capture_graphs(engine, live_batch_sizes(engine, engine.placement.topology.pp))


def live_batch_sizes(engine, pp: int) -> list[int]:
    """The decode batch sizes the running sequences make under `pp` stages: micro-batches of an even share
    (see LLMEngine.step)."""
    n = len(engine.scheduler.running)
    share = -(-n // pp) if n else 0
    return [min(share, n - start) for start in range(0, n, share)] if n else []


def live_buckets(engine, pp: int) -> int:
    """How many graphs a commit under `pp` stages captures, for plan's price (distinct batch sizes)."""
    return len(set(live_batch_sizes(engine, pp)))
