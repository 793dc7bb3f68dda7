"""Host microseconds of the decode step path, on CPU, without a GPU: each piece the driver and the output worker
run in series with the GPU, timed in-process on the real objects (scheduler, step channel, a socket pair like the
pool's, StepLayout packing into a static input, the sampler, the detokenizer). Medians over many steps.

engine.outputs (detokenizing) runs while the workers compute the next step (LLMEngine.finish_oldest sends it first),
so it is off the serial path. For guidance between code changes only: CPU numbers are never speed results.
    PYTHONPATH=$PWD python bench/step_host.py --out /root/decode/step_host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace

import torch

from rempd.engine.block_manager import BlockManager
from rempd.engine.detokenizer import IncrementalDetokenizer
from rempd.engine.llm_engine import LLMEngine, Request
from rempd.engine.sampler import sample
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.scheduler import Scheduler
from rempd.engine.sequence import Sequence, SequenceStatus
from rempd.model.make_checkpoint import make_checkpoint
from rempd.model.tokenizer import Tokenizer
from rempd.worker_pool.cuda_graphs import buckets_up_to
from rempd.worker_pool.step_channel import StepChannel
from rempd.worker_pool.step_tensors import StepLayout


def decoding_engine(batch: int, prompt: int, tokenizer: Tokenizer, vocab: int, block_size: int = 16):
    """An engine's host state with `batch` sequences mid-decode: what _output and the scheduler need."""
    blocks = BlockManager(batch * (prompt + 4096) // block_size, block_size)
    scheduler = Scheduler(blocks, 64, 4096, prompt + 4096)
    engine = SimpleNamespace(scheduler=scheduler, requests={})
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    for i in range(batch):
        ids = [1 + (97 * i + 31 * j) % (vocab - 1) for j in range(prompt)]
        seq = Sequence(f"r{i}", ids, params, seed=i)
        blocks.grow(seq, prompt)
        seq.num_computed, seq.status = prompt - 1, SequenceStatus.RUNNING
        seq.token_ids.append(1)  # its first generated token: the step decodes it
        scheduler.running.append(seq)
        engine.requests[seq.request_id] = Request(seq, IncrementalDetokenizer(tokenizer, ids))
    return engine


def measure(batch: int, steps: int, repeats: int, prompt: int, tokenizer: Tokenizer,
            vocab: int) -> dict[str, float]:
    """Median µs of each piece over `repeats` runs of `steps` decode steps from a `prompt`-token context (as
    bench/decode.py's requests: the block tables sent and packed grow with the context)."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        run_steps(decoding_engine(batch, prompt, tokenizer, vocab), steps, prompt, tokenizer, vocab, times)
    result = {name: statistics.median(values) for name, values in times.items()}
    for side in ("engine", "worker"):
        result[f"{side}.total"] = sum(v for k, v in result.items() if k.startswith(side + "."))
    return result


def run_steps(engine, steps: int, prompt: int, tokenizer: Tokenizer, vocab: int,
              times: dict[str, list[float]]) -> None:
    scheduler, batch = engine.scheduler, len(engine.requests)
    channel = StepChannel.create(size=64 << 20)
    reader = StepChannel.attach(channel.name)
    channel.unlink()
    driver_end, worker_end = Pipe()
    max_blocks = -(-(prompt + steps + 16) // scheduler.blocks.block_size)
    bucket = next(b for b in buckets_up_to(64) if b >= batch)
    layout = StepLayout(bucket, bucket, bucket, max_blocks)
    static = torch.zeros(layout.size, dtype=torch.long)  # stands in for a graph's static input on the device
    # each row's argmax a token that decodes to a whole character, as a trained model's mostly are (a byte-level
    # tokenizer's lone continuation bytes would hold the detokenizer back and grow its window every step)
    words = [i for i in range(vocab) if tokenizer.decode([i]).isalnum()]
    logits = torch.randn(batch, vocab)
    logits[torch.arange(batch), torch.tensor([words[i % len(words)] for i in range(batch)])] = 100.0
    clock = time.perf_counter
    skip = 4  # first steps warm caches and allocators

    def lap(name: str, since: float) -> float:
        now = clock()
        if i >= skip:
            times.setdefault(name, []).append(1e6 * (now - since))
        return now

    try:
        for i in range(steps):
            t = clock()
            scheduled = scheduler.schedule()
            t = lap("engine.schedule", t)
            step = scheduler.step_input(scheduled)
            t = lap("engine.step_input", t)
            driver_end.send(("execute_shared", (channel.write(step),)))
            t = lap("engine.send", t)
            method, (ref,) = worker_end.recv()
            t = lap("worker.recv", t)
            received = reader.read(ref)
            t = lap("worker.unpack", t)
            static.copy_(torch.from_numpy(layout.pack(received)), non_blocking=True)
            t = lap("worker.pack_copy", t)
            tokens = sample(logits, received.samples)
            t = lap("worker.sample", t)
            worker_end.send(("ok", tokens))
            t = lap("worker.reply", t)
            status, tokens = driver_end.recv()
            t = lap("engine.recv", t)
            updated = scheduler.postprocess(scheduled, tokens)
            t = lap("engine.postprocess", t)
            outputs = [LLMEngine._output(engine, seq) for seq in updated]
            t = lap("engine.outputs", t)
            assert len(outputs) == batch
    finally:
        reader.close()
        channel.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="remp-step-host-") as tmp:
        tokenizer = Tokenizer.from_dir(make_checkpoint("tiny-llama", Path(tmp) / "tiny", seed=0))
    vocab = tokenizer.vocab_size  # the logits too: the sampler's host work, not a CPU argmax over 32000
    result = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        result[batch] = measure(batch, args.steps, args.repeats, args.prompt, tokenizer, vocab)
    names = list(next(iter(result.values())))
    print("| µs per step (median) | " + " | ".join(f"batch {b}" for b in result) + " |")
    print("|---|" + "---|" * len(result))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:.1f}" for r in result.values()) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
