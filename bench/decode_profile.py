"""Where a decode step's time goes, on one GPU: the driver's and the worker's host phases laid on one timeline
(both log time.perf_counter stamps, one clock per host), the device span of each step (CUDA events from just before
its inputs are packed to its last kernel), and the kernels of a traced window of steps (torch.profiler in the
worker): wall - span is the time the device waits on the host, span - kernels busy the gaps between kernels.

Medians over the steady decode steps of a batch (the first --skip excluded). About 1 minute on one H100 after
the checkpoint (18 s to make; reused from --checkpoints):
    python bench/decode_profile.py --devices 0 --out $OUT/decode_profile.json
CPU smoke run: python bench/decode_profile.py --shape tiny-llama --devices cpu --batches 1,4 --prompt 32 --gen 24
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ensure_checkpoint  # noqa: E402
from decode import floor_ms, hbm_bandwidth, prompts  # noqa: E402

from rempd import LLM, SamplingParams  # noqa: E402

# One step's period, from the worker's reply with a batch's tokens to its reply with the next batch's, as a chain of
# phases (from, to): e/w = the driver's/worker's stamps of a batch, e+/w+ of the next one. Per batch the driver
# stamps begin (scheduling began), sent, replied (tokens in), done (outputs made); the worker received, unpacked,
# launched (stage launched), done (tokens ready). The driver makes a batch's outputs after sending the next batch,
# so "outputs" overlaps the next step's device work and is not part of the chain.
PHASES = [("to_engine", "w.done", "e.replied"), ("engine_postprocess", "e.replied", "e+.begin"),
          ("engine_schedule_send", "e+.begin", "e+.sent"), ("to_worker", "e+.sent", "w+.received"),
          ("worker_unpack", "w+.received", "w+.unpacked"), ("worker_pack_copy_launch", "w+.unpacked", "w+.launched"),
          ("worker_wait_gpu_and_sample", "w+.launched", "w+.done"), ("wall", "w.done", "w+.done"),
          ("outputs", "e+.sent", "e.done"), ("driver_period", "e.replied", "e+.replied")]
CHAIN = PHASES[:7]


def run_batch(llm: LLM, batch: int, prompt: int, gen: int, vocab: int, trace: tuple[int, int]) -> tuple[list, dict]:
    """Generate `gen` tokens for `batch` requests at once under the workers' profile; the driver's step rows and
    what the output worker reports (its rows and, when `trace` = (after, steps) asks, its kernel table)."""
    engine = llm.engine
    output = engine.active.index(engine.placement.output_worker)
    engine.pool.call("profile", "start", *trace, workers=engine.active)
    engine.step_log.clear()
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, prompt, vocab)):
        engine.add_request(f"p{batch}-{time.monotonic_ns()}-{i}", ids, params)
    while engine.has_unfinished():
        engine.step()
    worker = engine.pool.call("profile", "stop", workers=engine.active)[output]
    return engine.step_log.to_dicts(), worker


def phase_medians(engine_rows: list[dict], worker_rows: list[dict], batch: int, skip: int) -> dict:
    """Median milliseconds of each phase over the steady decode steps: pairs of whole-batch decode steps after the
    first `skip`."""
    if len(engine_rows) != len(worker_rows):
        raise RuntimeError(f"{len(engine_rows)} driver steps but {len(worker_rows)} worker steps")
    whole = [w["seqs"] == w["tokens"] == batch for w in worker_rows]
    decode = [i for i in range(len(whole) - 1) if whole[i] and whole[i + 1]][skip:]
    if not decode:
        raise RuntimeError(f"no steady decode steps at batch {batch}")
    stamps = lambda i: {**{f"e.{k}": v for k, v in engine_rows[i].items()},  # noqa: E731
                        **{f"w.{k}": v for k, v in worker_rows[i].items()},
                        **{f"e+.{k}": v for k, v in engine_rows[i + 1].items()},
                        **{f"w+.{k}": v for k, v in worker_rows[i + 1].items()}}
    rows = [stamps(i) for i in decode]
    result = {name: 1e3 * statistics.median(r[b] - r[a] for r in rows) for name, a, b in PHASES}
    spans = [w["gpu_ms"] for w in (worker_rows[i + 1] for i in decode) if not math.isnan(w["gpu_ms"])]
    result["gpu_span"] = statistics.median(spans) if spans else None  # no CUDA events off CUDA
    # the device waits on the host for the rest of a step
    result["gpu_idle"] = None if result["gpu_span"] is None else result["wall"] - result["gpu_span"]
    result["graph_steps"] = sum(worker_rows[i + 1]["graph"] for i in decode)
    result["steps"] = len(decode)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--checkpoints", default="/tmp/remp-checkpoints")
    ap.add_argument("--devices", default="0", help="one CUDA id, or 'cpu' for one CPU worker")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--skip", type=int, default=8, help="first decode steps left out of the medians")
    ap.add_argument("--trace-steps", type=int, default=16, help="graph steps whose kernels are traced")
    ap.add_argument("--async-tokens", action="store_true",
                    help="EngineConfig.async_tokens: each step is sent before the previous one's tokens are in "
                         "(the worker's 'done' stamp is then its launch, so compare wall and driver_period)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cpu = args.devices == "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    model = ensure_checkpoint(args.checkpoints, args.shape)
    result = {"shape": args.shape, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "card": "cpu" if cpu else torch.cuda.get_device_name(int(args.devices)), "prompt": args.prompt,
              "gen": args.gen, "async_tokens": args.async_tokens, "checkpoint_s": time.perf_counter() - start,
              "rows": []}
    first = "cpu" if cpu else f"cuda:{args.devices}"
    result["hbm_bytes_per_s"] = bandwidth = hbm_bandwidth(first, (64 << 20) if cpu else (1 << 30))
    options = dict(cpu_workers=1) if cpu else dict(devices=[int(args.devices)])
    with LLM(model, max_num_seqs=max(batches), max_model_len=args.prompt + args.gen + 16,
             max_num_batched_tokens=4096, async_tokens=args.async_tokens, **options) as llm:
        engine = llm.engine
        vocab = engine.model_config.vocab_size
        run_batch(llm, 1, args.prompt, 4, vocab, (0, 0))  # compiles the prefill kernels
        for batch in batches:
            engine_rows, worker = run_batch(llm, batch, args.prompt, args.gen, vocab, (0, 0))
            phases = phase_medians(engine_rows, worker["steps"], batch, args.skip)
            # a second run for the kernel trace: the profiler's own overhead stays out of the timeline above
            traced = run_batch(llm, batch, args.prompt, args.gen, vocab, (args.skip, args.trace_steps))[1]
            memory, _ = floor_ms(engine, 1, 1, batch, args.prompt + args.gen // 2, bandwidth, 0.0)
            row = {"batch": batch, **phases, "floor_ms": memory, "kernels": traced["kernels"],
                   "driver_host_ms_per_step": engine.status()["driver_host_ms_per_step"]}
            result["rows"].append(row)
            print_row(row)
            result["total_s"] = time.perf_counter() - start
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.shape} on {result['card']} ({result['commit']}): {result['total_s']:.0f} s in all; "
          f"wrote {args.out}")


def print_row(row: dict) -> None:
    kernels = row["kernels"] or {}
    busy = kernels.get("busy_ms_per_step", math.nan)
    span = math.nan if row["gpu_span"] is None else row["gpu_span"]
    print(f"\nbatch {row['batch']}: step {row['wall']:.3f} ms (floor {row['floor_ms']:.3f}, "
          f"{row['wall'] / row['floor_ms']:.2f}x); device span {span:.3f} ms, so the device waits on the host "
          f"{row['wall'] - span:.3f} ms; kernels busy {busy:.3f} ms in {kernels.get('kernels_per_step', 0):.0f} "
          f"kernels; medians of {row['steps']} steps ({row['graph_steps']} graph replays)")
    print("  " + " | ".join(f"{name} {row[name]:.3f}" for name, _, _ in CHAIN) +
          f" (overlapped: outputs {row['outputs']:.3f}); driver period {row['driver_period']:.3f}")
    # with --async-tokens a step is sent before the previous one's tokens are in: the chain above overlaps itself
    # (negative phases), and wall, driver_period and the device span are the figures to compare
    if "error" in kernels or kernels.get("kernels_per_step") == 0:
        print(f"  no kernels traced: {kernels.get('error', 'the trace saw no graph kernels')}")
    for k in kernels.get("top", [])[:10]:
        print(f"  {k['ms_per_step']:7.3f} ms {k['share']:6.1%} {k['calls_per_step']:5.0f}x  {k['name'][:90]}")


if __name__ == "__main__":
    sys.exit(main())
