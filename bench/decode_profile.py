"""Where a decode step's time goes, on one GPU or several (TP, PP): the driver's and the output worker's host phases
laid on one timeline (both log time.perf_counter stamps, one clock per host), the device span of each worker's steps
(CUDA events from just before its inputs are packed to its last kernel), and the kernels of a traced window of steps
(torch.profiler in every worker; the table is the output worker's, the first of the last stage: at TP > 1 it holds
the NCCL all-reduces): wall - span is the time the device waits on the host, span - kernels busy the gaps between
kernels. The floor is bench/decode.py's: weights and KV read once, plus the all-reduces timed in a CUDA graph.

Medians over the steady decode steps of a batch (the first --skip excluded). About 1 minute on one H100 after
the checkpoint (18 s to make; reused from --checkpoints):
    python bench/decode_profile.py --devices 0 --out $OUT/decode_profile.json
    python bench/decode_profile.py --devices 0,1,2,3 --topology TP4PP1 --out $OUT/decode_profile_tp4.json
CPU smoke runs (the second with 4 CPU workers):
    python bench/decode_profile.py --shape tiny-llama --devices cpu --batches 1,4 --prompt 32 --gen 24
    python bench/decode_profile.py --shape tiny-llama --devices cpu --topology TP2PP2 --batches 1,4 --prompt 32 --gen 24
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ensure_checkpoint  # noqa: E402
from decode import floor_ms, hbm_bandwidth, prompts  # noqa: E402
from step_phases import phase_medians, print_row  # noqa: E402

from rempd import LLM, SamplingParams  # noqa: E402
from rempd.topology import Topology  # noqa: E402


def run_batch(llm: LLM, batch: int, prompt: int, gen: int, vocab: int, trace: tuple[int, int]) -> tuple[list, list]:
    """Generate `gen` tokens for `batch` requests at once under the workers' profile: the driver's step rows and what
    each active worker reports (its rows and, when `trace` = (after, steps) asks, its kernel table)."""
    engine = llm.engine
    engine.pool.call("profile", "start", *trace, workers=engine.active)
    engine.step_log.clear()
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, prompt, vocab)):
        engine.add_request(f"p{batch}-{time.monotonic_ns()}-{i}", ids, params)
    while engine.has_unfinished():
        engine.step()
    return engine.step_log.to_dicts(), engine.pool.call("profile", "stop", workers=engine.active)


def all_reduce_s(llm: LLM, micro: int) -> float:
    """Seconds of one all-reduce of a micro-batch's hidden states on the TP groups (0 at TP1)."""
    engine = llm.engine
    numel = micro * engine.model_config.hidden_size
    reduce = engine.pool.call("measure_all_reduce", [numel], workers=engine.active)
    return max((r[numel] for r in reduce if r), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--checkpoints", default="/tmp/remp-checkpoints")
    ap.add_argument("--devices", default="0", help="CUDA ids (the first tp × pp are used), or 'cpu' for one CPU worker per shard")
    ap.add_argument("--topology", default="TP1PP1", type=Topology.parse)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--skip", type=int, default=8, help="first decode steps left out of the medians")
    ap.add_argument("--trace-steps", type=int, default=16, help="graph steps whose kernels are traced")
    ap.add_argument("--async-tokens", action=argparse.BooleanOptionalAction, default=True,
                    help="EngineConfig.async_tokens: each step is sent before the previous one's "
                         "tokens are in (the worker's 'done' stamp is then its launch, so compare wall and "
                         "driver_period)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    topology: Topology = args.topology
    cpu = args.devices == "cpu"
    devices = [] if cpu else [int(d) for d in args.devices.split(",")][:topology.size]  # the first tp × pp
    if not cpu and len(devices) < topology.size:
        ap.error(f"{topology} needs {topology.size} devices, --devices names {len(devices)}")
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    model = ensure_checkpoint(args.checkpoints, args.shape)
    result = {"shape": args.shape, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "card": "cpu" if cpu else torch.cuda.get_device_name(devices[0]), "devices": devices or "cpu",
              "topology": str(topology), "prompt": args.prompt, "gen": args.gen,
              "async_tokens": args.async_tokens,
              "checkpoint_s": time.perf_counter() - start, "rows": []}
    first = "cpu" if cpu else f"cuda:{devices[0]}"
    result["hbm_bytes_per_s"] = bandwidth = hbm_bandwidth(first, (64 << 20) if cpu else (1 << 30))
    options = dict(cpu_workers=topology.size) if cpu else dict(devices=devices)
    with LLM(model, tp=topology.tp, pp=topology.pp, max_num_seqs=max(batches),
             max_model_len=args.prompt + args.gen + 16, max_num_batched_tokens=4096, async_tokens=args.async_tokens,
             **options) as llm:
        engine = llm.engine
        vocab = engine.model_config.vocab_size
        output = engine.active.index(engine.placement.output_worker)
        run_batch(llm, 1, args.prompt, 4, vocab, (0, 0))  # compiles the prefill kernels
        for batch in batches:
            engine_rows, workers = run_batch(llm, batch, args.prompt, args.gen, vocab, (0, 0))
            phases = phase_medians(engine_rows, [w["steps"] for w in workers], output, batch, topology.pp,
                                   args.skip)
            # a second run for the kernel trace: the profiler's own overhead stays out of the timeline above
            traced = run_batch(llm, batch, args.prompt, args.gen, vocab, (args.skip, args.trace_steps))[1]
            memory, comm = floor_ms(engine, topology.tp, topology.pp, batch, args.prompt + args.gen // 2, bandwidth,
                                    all_reduce_s(llm, max(phases["micro_batches"])))
            row = {"batch": batch, **phases, "floor_ms": memory + comm, "memory_floor_ms": memory,
                   "all_reduce_floor_ms": comm, "ratio": phases["token_period"] / (memory + comm),
                   "kernels": traced[output]["kernels"],
                   "busy_ms_by_worker": [(w["kernels"] or {}).get("busy_ms_per_step") for w in traced],
                   "driver_host_ms_per_step": engine.status()["driver_host_ms_per_step"]}
            result["rows"].append(row)
            print_row(row)
            result["total_s"] = time.perf_counter() - start
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.shape} {topology} on {result['card']} ({result['commit']}), async tokens "
          f"{'on' if result['async_tokens'] else 'off'}: {result['total_s']:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
