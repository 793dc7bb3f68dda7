"""Decode step time against its memory-bandwidth floor, beside transformers generate() on the same card.

One engine serves every topology in turn (it switches live between them: that also exercises graph re-capture),
and one checkpoint serves everything. On 4 GPUs, about 5 minutes including checkpoint creation:
    python bench/decode.py --devices 0,1,2,3 --out $OUT/decode_llama2-7b.json   (keep the JSON in bench/results/)
CPU smoke run: python bench/decode.py --shape tiny-llama --devices cpu --batches 1,4 --prompt 32 --gen 8 --hf-batches 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rempd import LLM, SamplingParams
from rempd.migrate.report import SwitchReport
from rempd.model.checkpoint import Checkpoint
from rempd.model.make_checkpoint import make_checkpoint
from rempd.topology import Topology


def parse_topology(name: str) -> tuple[int, int]:
    topology = Topology.parse(name)
    return topology.tp, topology.pp


def hbm_bandwidth(device: str, size: int) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * 5 * size / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[1 + (97 * i + 31 * j) % (vocab - 1) for j in range(length)] for i in range(batch)]


def transformers_step(model_dir: Path, device: str, batch: int, prompt: int, gen: int, vocab: int) -> float:
    """Seconds per decode step of generate(): (time for gen tokens - time for 1 token) / (gen - 1)."""
    from transformers import AutoModelForCausalLM

    global _HF
    if _HF is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        _HF = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts(batch, prompt, vocab), device=device)

    def run(new: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            _HF.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(2)  # warm
    return (run(gen) - run(1)) / (gen - 1)


_HF = None


def engine_decode(llm: LLM, batch: int, prompt: int, gen: int, vocab: int) -> dict:
    """Run `batch` requests together; a step is the median gap between a request's consecutive tokens."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    times: dict[str, list[float]] = {}
    for i, ids in enumerate(prompts(batch, prompt, vocab)):
        engine.add_request(f"b{batch}-{i}", ids, params)
        times[f"b{batch}-{i}"] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            times[out.request_id].append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for t in times.values() for a, b in zip(t[1:], t[2:])]  # skip the gap after the prefill
    decode_start = max(t[0] for t in times.values())
    return {"step_ms": 1e3 * statistics.median(gaps), "prefill_s": decode_start - start,
            "tokens_per_s": batch * (gen - 1) / (end - decode_start)}


def floor_ms(engine, tp: int, pp: int, batch: int, context: int, bandwidth: float,
             all_reduce_s: float) -> tuple[float, float]:
    """(memory floor, all-reduce floor) of one decode step: every stage reads its weights and its sequences' KV
    once, the stages of a token run one after another, and each layer all-reduces twice (plus the embedding)."""
    cfg = engine.model_config
    weights = sum(info["weight_bytes"] for info in engine.shard_infos)
    if not cfg.tie_word_embeddings:  # the embedding table is looked up, not read
        weights -= cfg.vocab_size * cfg.hidden_size * torch.empty((), dtype=engine_dtype(engine)).element_size()
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty(
        (), dtype=engine_dtype(engine)).element_size()
    memory = (weights + batch * context * kv_per_token) / tp / bandwidth
    return 1e3 * memory, 1e3 * (2 * cfg.num_layers + 1) * all_reduce_s


def engine_dtype(engine) -> torch.dtype:
    return getattr(torch, engine.template.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--checkpoint", type=Path, help="reuse this checkpoint instead of making one")
    parser.add_argument("--devices", default="0,1,2,3", help="CUDA ids, or 'cpu' for 4 CPU workers")
    parser.add_argument("--topologies", default="TP1PP1,TP4PP1,TP2PP2")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--hf-batches", default="1,64")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--async-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="EngineConfig.async_tokens: each step is sent before the previous one's tokens are in "
                             "(at PP > 1 the last stage hands them to the first on the devices)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cpu = args.devices == "cpu"
    devices = [] if cpu else [int(d) for d in args.devices.split(",")]
    first = "cpu" if cpu else f"cuda:{devices[0]}"
    batches = [int(b) for b in args.batches.split(",")]
    topologies = [t for t in args.topologies.split(",") if
                  (lambda tp, pp: tp * pp <= (4 if cpu else len(devices)))(*parse_topology(t))]
    result = {"shape": args.shape, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "card": "cpu" if cpu else torch.cuda.get_device_name(devices[0]), "devices": args.devices,
              "async_tokens": args.async_tokens, "prompt": args.prompt, "gen": args.gen, "rows": [],
              "transformers": []}
    with tempfile.TemporaryDirectory(prefix="remp-decode-") as tmp:
        start = time.perf_counter()
        model_dir = args.checkpoint or make_checkpoint(args.shape, Path(tmp) / args.shape, seed=0)
        result["checkpoint_s"] = time.perf_counter() - start
        vocab = Checkpoint(model_dir).config.vocab_size
        bandwidth = hbm_bandwidth(first, (1 << 30) if not cpu else (64 << 20))
        result["hbm_bytes_per_s"] = bandwidth
        print(f"checkpoint {result['checkpoint_s']:.0f} s, copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
        global _HF
        for batch in [int(b) for b in args.hf_batches.split(",") if b]:
            step = transformers_step(model_dir, first, batch, args.prompt, args.gen, vocab)
            result["transformers"].append({"batch": batch, "step_ms": 1e3 * step, "tokens_per_s": batch / step})
            print(f"transformers batch {batch}: {1e3 * step:.1f} ms/step", flush=True)
        _HF = None
        if not cpu:
            torch.cuda.empty_cache()
        tp, pp = parse_topology(topologies[0])
        options = dict(cpu_workers=4) if cpu else dict(devices=devices)
        with LLM(model_dir, tp=tp, pp=pp, max_num_seqs=max(batches), max_model_len=args.prompt + args.gen + 16,
                 max_num_batched_tokens=4096, async_tokens=args.async_tokens, **options) as llm:
            engine = llm.engine
            for name in topologies:
                tp, pp = parse_topology(name)
                switch = None
                if Topology(tp, pp) != engine.placement.topology:
                    report = SwitchReport(id=name, source=str(engine.placement), target=name)
                    engine.switch(Topology(tp, pp), report)
                    assert report.state == "committed", report.error
                    switch = {"total_s": report.total_seconds, "phases": report.phases,
                              "graph_capture_s": report.transform_detail.get("graph_capture", 0.0)}
                capture = max(info.get("graph_capture_s", 0.0) for info in engine.shard_infos)
                for batch in batches:
                    micro = -(-batch // pp)
                    numel = micro * engine.model_config.hidden_size
                    reduce = engine.pool.call("measure_all_reduce", [numel], workers=engine.active)
                    reduce_s = max((r[numel] for r in reduce if r), default=0.0)
                    measured = engine_decode(llm, batch, args.prompt, args.gen, vocab)
                    memory, comm = floor_ms(engine, tp, pp, batch, args.prompt + args.gen // 2, bandwidth, reduce_s)
                    row = {"topology": name, "batch": batch, **measured, "floor_ms": memory + comm,
                           "memory_floor_ms": memory, "all_reduce_floor_ms": comm,
                           "ratio": measured["step_ms"] / (memory + comm), "graph_capture_s": capture,
                           "switch_in": switch, "host": engine.status()["driver_host_ms_per_step"],
                           "workers": [{k: info.get(k) for k in ("graph_steps", "steps", "host_ms_per_step")}
                                       for info in engine.pool.call("info", workers=engine.active)]}
                    result["rows"].append(row)
                    print(f"{name} batch {batch}: {row['step_ms']:.2f} ms/step, floor {row['floor_ms']:.2f} ms "
                          f"({row['ratio']:.2f}x)", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    hf = {r["batch"]: r for r in result["transformers"]}
    print(f"\n{result['shape']} on {result['card']} ({result['commit']}), prompt {result['prompt']}, "
          f"{result['gen']} generated; async tokens {'on' if result['async_tokens'] else 'off'}; "
          f"HBM copy {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s\n")
    print("| topology | batch | step ms | floor ms (mem + all-reduce) | step/floor | tok/s | transformers tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        peer = hf.get(r["batch"]) if r["topology"] == "TP1PP1" else None
        peer_rate = f"{peer['tokens_per_s']:.0f}" if peer else ""
        print(f"| {r['topology']} | {r['batch']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} "
              f"({r['memory_floor_ms']:.2f} + {r['all_reduce_floor_ms']:.2f}) | {r['ratio']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {peer_rate} |")

if __name__ == "__main__":
    sys.exit(main())
