"""The phases of a decode step, from the driver's step log and the workers' (bench/decode_profile.py): medians over
the steady decode steps of a batch, and their printout."""
from __future__ import annotations

import math
import statistics

# One step's period, from the output worker's reply with a batch's tokens to its reply with the next batch's, as a
# chain of phases (from, to): e/w = the driver's/output worker's stamps of a batch, e+/w+ of the next one. Per batch
# the driver stamps begin (scheduling began), sent, replied (tokens in), done (outputs made); the worker received,
# unpacked, launched (stage launched), done (tokens ready). The driver makes a batch's outputs after sending the next
# batch, so "outputs" overlaps the next step's device work and is not part of the chain.
PHASES = [("to_engine", "w.done", "e.replied"), ("engine_postprocess", "e.replied", "e+.begin"),
          ("engine_schedule_send", "e+.begin", "e+.sent"), ("to_worker", "e+.sent", "w+.received"),
          ("worker_unpack", "w+.received", "w+.unpacked"), ("worker_pack_copy_launch", "w+.unpacked", "w+.launched"),
          ("worker_wait_gpu_and_sample", "w+.launched", "w+.done"), ("wall", "w.done", "w+.done"),
          ("outputs", "e+.sent", "e.done"), ("driver_period", "e.replied", "e+.replied")]
CHAIN = PHASES[:7]


def micro_batches(batch: int, pp: int) -> list[int]:
    """Sizes of the micro-batches a decode of `batch` sequences runs as (the scheduler's split under pp)."""
    share = -(-batch // pp)
    return [min(share, batch - start) for start in range(0, batch, share)]


def phase_medians(engine_rows: list[dict], workers_rows: list[list[dict]], output: int, batch: int, pp: int,
                  skip: int) -> dict:
    """Median milliseconds of each phase over the steady decode steps: steps whose micro-batches are all whole
    decodes, after the first `skip`. workers_rows: every active worker's log, `output` the index of the one that
    replies with tokens. Under pp a batch runs as micro-batches one after another: a sequence's next token comes
    len(micro-batches) steps later (token_period), and the chain overlaps itself (more than one step in flight)."""
    worker_rows = workers_rows[output]
    if any(len(rows) != len(engine_rows) for rows in workers_rows):
        raise RuntimeError(f"{len(engine_rows)} driver steps but {[len(r) for r in workers_rows]} worker steps")
    sizes = micro_batches(batch, pp)
    whole = [w["seqs"] == w["tokens"] and w["seqs"] in sizes for w in worker_rows]
    period = len(sizes)
    decode = [i for i in range(len(whole) - period) if all(whole[i:i + period + 1])][skip:]
    if not decode:
        raise RuntimeError(f"no steady decode steps at batch {batch}")
    stamps = lambda i: {**{f"e.{k}": v for k, v in engine_rows[i].items()},  # noqa: E731
                        **{f"w.{k}": v for k, v in worker_rows[i].items()},
                        **{f"e+.{k}": v for k, v in engine_rows[i + 1].items()},
                        **{f"w+.{k}": v for k, v in worker_rows[i + 1].items()}}
    rows = [stamps(i) for i in decode]
    result = {name: 1e3 * statistics.median(r[b] - r[a] for r in rows) for name, a, b in PHASES}
    result["token_period"] = 1e3 * statistics.median(worker_rows[i + period]["done"] - worker_rows[i]["done"]
                                                     for i in decode)
    # each worker's device span of a step (on a later stage it starts once the previous stage's output is in)
    result["gpu_span_by_worker"] = [median_span([log[i + 1]["gpu_ms"] for i in decode]) for log in workers_rows]
    result["gpu_span"] = result["gpu_span_by_worker"][output]  # None off CUDA: no events
    # the output worker's device waits on the host (and, under pp, on the stages before it) for the rest of a step
    result["gpu_idle"] = None if result["gpu_span"] is None else result["wall"] - result["gpu_span"]
    result["graph_steps"] = sum(worker_rows[i + 1]["graph"] for i in decode)
    result["steps"] = len(decode)
    result["micro_batches"] = sizes
    return result


def median_span(spans: list[float]) -> float | None:
    spans = [s for s in spans if not math.isnan(s)]
    return statistics.median(spans) if spans else None


def print_row(row: dict) -> None:
    kernels = row["kernels"] or {}
    busy = kernels.get("busy_ms_per_step", math.nan)
    span = math.nan if row["gpu_span"] is None else row["gpu_span"]
    floor = row["floor_ms"]
    micro = "" if len(row["micro_batches"]) == 1 else f" as micro-batches {row['micro_batches']}"
    print(f"\nbatch {row['batch']}{micro}: token period {row['token_period']:.3f} ms (floor {floor:.3f} = memory "
          f"{row['memory_floor_ms']:.3f} + all-reduce {row['all_reduce_floor_ms']:.3f}, "
          f"{row['token_period'] / floor:.2f}x); step {row['wall']:.3f} ms, device span {span:.3f} ms, so the "
          f"device waits {row['wall'] - span:.3f} ms; kernels busy {busy:.3f} ms in "
          f"{kernels.get('kernels_per_step', 0):.0f} kernels; medians of {row['steps']} steps "
          f"({row['graph_steps']} graph replays)")
    print("  " + " | ".join(f"{name} {row[name]:.3f}" for name, _, _ in CHAIN) +
          f" (overlapped: outputs {row['outputs']:.3f}); driver period {row['driver_period']:.3f}")
    if len(row["gpu_span_by_worker"]) > 1:
        print("  device span by worker: " + ", ".join("-" if s is None else f"{s:.3f}"
                                                      for s in row["gpu_span_by_worker"]))
    # with --async-tokens or under pp a step is sent before the previous one's tokens are in: the chain above
    # overlaps itself (negative phases), and wall, driver_period and the device span are the figures to compare
    if "error" in kernels or kernels.get("kernels_per_step") == 0:
        print(f"  no kernels traced: {kernels.get('error', 'the trace saw no graph kernels')}")
    for k in kernels.get("top", [])[:12]:
        print(f"  {k['ms_per_step']:7.3f} ms {k['share']:6.1%} {k['calls_per_step']:5.0f}x  {k['name'][:90]}")
