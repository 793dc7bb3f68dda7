"""Commit-phase graph capture of the first live switch into each TP size the workers have not run, with and without
the start-up kernel warm-up (worker_pool/kernel_warmup.py). Each variant runs in a fresh process with its own empty
TRITON_CACHE_DIR, so Triton's disk cache cannot hide a compilation. 4 GPUs, about 2 minutes for llama3-1b:
    python bench/first_switch_capture.py --out $OUT/first_switch_capture.json
(--model DIR: an existing checkpoint instead, e.g. /tmp/remp-checkpoints/llama2-7b from gpu_session.sh checkpoint.)
CPU smoke run: python bench/first_switch_capture.py --shape tiny-llama --devices cpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHAIN = ["TP2PP2", "TP4PP1", "TP1PP4", "TP2PP2"]  # from TP1PP4: two new TP sizes, then two already run


def one_run(model: str, devices: str, warm: bool) -> dict:
    from rempd import LLM, SamplingParams
    from rempd.engine import llm_engine
    from rempd.migrate.report import SwitchReport
    from rempd.topology import Topology

    if not warm:  # the engine as before the warm-up existed
        llm_engine.warm_kernels = lambda engine: setattr(engine, "kernel_warm_seconds", 0.0)
    cpu = devices == "cpu"
    options = dict(cpu_workers=4) if cpu else dict(devices=[int(d) for d in devices.split(",")])
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    switches = []
    with LLM(model, tp=1, pp=4, max_model_len=1024, max_num_seqs=16, **options) as llm:
        engine = llm.engine
        for i in range(6):  # live sequences: a commit captures the graphs of their batch
            engine.add_request(f"r{i}", [1 + (7 * i + j) % 500 for j in range(20)], params)
        for target in CHAIN:
            for _ in range(4):
                engine.step()
            report = SwitchReport(id=target, source=str(engine.placement), target=target)
            engine.switch(Topology.parse(target), report)
            assert report.state == "committed", report.error
            switches.append({"target": target, "graph_capture_s": report.transform_detail["graph_capture"],
                             "total_s": report.total_seconds})
        status = engine.status()
    return {"warm": warm, "kernel_warm_s": status["kernel_warm_s"], "switches": switches}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="checkpoint directory; default: make one of --shape")
    parser.add_argument("--shape", default="llama3-1b")
    parser.add_argument("--devices", default="0,1,2,3", help="4 CUDA ids, or cpu")
    parser.add_argument("--out")
    parser.add_argument("--one", choices=["warm", "cold"], help=argparse.SUPPRESS)  # a child: one variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.model, args.devices, args.one == "warm")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from rempd.model.make_checkpoint import make_checkpoint

            model = str(make_checkpoint(args.shape, Path(tmp) / args.shape, seed=0))
        results = []
        for variant in ("cold", "warm"):
            env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}
            out = subprocess.run([sys.executable, __file__, "--model", model, "--devices", args.devices,
                                  "--one", variant], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
