"""Compiling, at start-up, the Triton kernels of every TP size a worker may run, so that no switch compiles.

The kernels take per-TP-rank sizes as constexprs (rotary_store's head counts, silu_mul's width, the decode
combine's heads, paged attention's GQA group), and whether a decode step splits its keys depends on the KV heads
per rank: without this, a worker's first switch into a TP size it had not run compiles them inside the switch's
pause, in the commit's graph capture (4x H100, llama2-7b: the first switch into a TP size spent 0.22-0.44 s
capturing, later ones 0.01-0.08 s; how much of that was compiling is still to be measured).

Triton also specializes on dtypes and on the 16-divisibility of integer arguments and pointers, so the dummy steps
run here are laid out as real ones: each decode graph bucket's padded inputs exactly as captured (same layout, same
block-table width), q a view into a fused qkv projection, the cache one layer of a KVShape pool, and eager prefill
chunks whose packed metadata lands at each 16-byte alignment an eager step's can. They go through the same
wrappers the model calls (ops_for, KernelMetadata.attend), so a kernel path change carries over. Values are zeros:
only the launches matter."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from rempd.engine.kv_cache import KVShape
from rempd.engine.step_input import StepInput
from rempd.model.config import ModelConfig
from rempd.model.fused_ops import ops_for
from rempd.model.paged_attention import KernelMetadata, split_kv_below
from rempd.model.rotary import Rotary
from rempd.model.sharding import even_range
from rempd.topology import kv_heads_per_rank
from rempd.worker_pool.cuda_graphs import buckets_up_to, idle_inputs
from rempd.worker_pool.step_tensors import to_device

log = logging.getLogger("rempd.kernels")


@dataclass(frozen=True)
class WarmupShape:
    """The engine settings that, besides the TP size, fix which kernel variants steps launch."""
    block_size: int
    max_len: int  # the stages' rotary length; decode graphs' block tables are max_len / block_size wide
    max_batch: int  # the largest decode graph bucket (max_num_seqs)


@dataclass(frozen=True)
class RankWidths:
    """What one TP rank's layer launches depend on."""
    q_heads: int
    kv_heads: int
    intermediate: tuple[int, ...]  # gate/up widths of the ranks: the last one is narrower when tp does not divide


def rank_widths(cfg: ModelConfig, tp: int) -> RankWidths:
    widths = {stop - start for start, stop in (even_range(cfg.intermediate_size, tp, r) for r in range(tp))}
    return RankWidths(cfg.num_heads // tp, kv_heads_per_rank(cfg.num_kv_heads, tp),
                      tuple(sorted(w for w in widths if w > 0)))


def warm_kernels(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, kernels: bool, tp_sizes: list[int],
                 shape: WarmupShape) -> float:
    """Compile the kernels of these TP sizes on this worker. Seconds taken; 0 off CUDA or on the reference
    attention, which run no compiled kernel (under TRITON_INTERPRET nothing is compiled either)."""
    if device.type != "cuda" or not kernels:
        return 0.0
    start = time.perf_counter()
    try:
        run_warmup(cfg, dtype, device, tp_sizes, shape)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - only a speed-up: a step compiles what this did not
        log.warning("kernel warm-up failed; the first step of each TP size compiles its kernels", exc_info=True)
    # the KV pool is sized from the driver's free memory: hand back the dummies' cached blocks first
    torch.cuda.empty_cache()
    return time.perf_counter() - start


@torch.inference_mode()
def run_warmup(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp_sizes: list[int],
               shape: WarmupShape) -> None:
    """One dummy layer per TP size over every step kind; the device-agnostic part (the CPU tests run it under
    Triton's interpreter)."""
    rotary = Rotary(cfg, shape.max_len, device)
    max_blocks = -(-shape.max_len // shape.block_size)  # as Worker.capture_graphs sizes the graphs' tables
    # one layer of a pool: no kernel depends on the block count; two prefill chunks of block_size + 2 fit
    num_blocks = 2 * -(-(shape.block_size + 2) // shape.block_size)
    for tp in tp_sizes:
        widths = rank_widths(cfg, tp)
        kv = KVShape(1, shape.block_size, widths.kv_heads, cfg.head_dim, dtype)
        layer_kv = kv.view(kv.allocate(num_blocks, device), num_blocks)[0]
        for _ids, positions, samples, meta in step_inputs(shape, max_blocks, widths.kv_heads, device):
            run_layer(cfg, widths, rotary, layer_kv, positions, samples, meta, dtype)


def step_inputs(shape: WarmupShape, max_blocks: int, kv_heads: int,
                device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, KernelMetadata]]:
    """Step tensors as the runner builds them: each decode graph bucket (split-KV below SPLIT_KV_BELOW
    (sequence, KV head) pairs, unsplit above), an eager decode step past that bound, and prefill chunks."""
    steps = []
    for size in buckets_up_to(shape.max_batch):
        layout, flat = idle_inputs(size, max_blocks, device)
        steps.append(layout.unpack(flat, max_query_len=1))
    unsplit = split_kv_below() // kv_heads + 1
    steps.append(to_device(StepInput([0] * unsplit, [0] * unsplit, [-1] * unsplit, [1] * unsplit, [1] * unsplit,
                                     [[0]] * unsplit, list(range(unsplit)), [None] * unsplit), device))
    # an eager step packs positions, sample rows, context lengths, query starts and block tables one after
    # another in one int64 array: token parity x (sequence count, sample count) parity covers each pointer's
    # 16-byte alignment; chunks of two blocks keep the table width off the 1 and 16 that Triton specializes
    short, long = shape.block_size + 1, shape.block_size + 2  # one odd, one even
    for query_lens in ([long], [short], [long, long], [short, long]):
        if long <= shape.max_len:  # else no prompt that long exists
            steps.append(to_device(prefill_step(query_lens, shape.block_size), device))
    return steps


def prefill_step(query_lens: list[int], block_size: int) -> StepInput:
    """Fresh prompts of these lengths, each in its own blocks, each sampling its last token."""
    positions, slots, tables, first = [], [], [], 0
    for length in query_lens:
        table = list(range(first, first + -(-length // block_size)))
        first += len(table)
        tables.append(table)
        positions += range(length)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(length)]
    ends = list(itertools.accumulate(query_lens))
    return StepInput([0] * len(positions), positions, slots, list(query_lens), list(query_lens), tables,
                     [end - 1 for end in ends], [None] * len(query_lens))


def run_layer(cfg: ModelConfig, widths: RankWidths, rotary: Rotary, kv: torch.Tensor, positions: torch.Tensor,
              samples: torch.Tensor, meta: KernelMetadata, dtype: torch.dtype) -> None:
    """The kernel launches of DecoderLayer.forward on one rank, and the last stage's final norm; the matmuls and
    all-reduces between them only make fresh, contiguous tensors, as torch.zeros does here."""
    ops, device, tokens = ops_for(meta), kv.device, positions.shape[0]
    eps, head_dim, hidden = cfg.rms_norm_eps, cfg.head_dim, cfg.hidden_size
    q_width, kv_width = widths.q_heads * head_dim, widths.kv_heads * head_dim
    weight = torch.ones(hidden, dtype=dtype, device=device)

    def fresh(width: int) -> torch.Tensor:
        return torch.zeros(tokens, width, dtype=dtype, device=device)

    _, residual = ops.add_rms_norm(fresh(hidden), None, weight, eps)  # a stage's first layer
    q = ops.rotate_and_store(fresh(q_width + 2 * kv_width), positions, rotary, meta, kv, q_width, kv_width,
                             head_dim)
    meta.attend(q, kv[0], kv[1], head_dim ** -0.5)
    _, residual = ops.add_rms_norm(fresh(hidden), residual, weight, eps)
    for width in widths.intermediate:
        ops.silu_mul(fresh(2 * width))
    ops.add_rms_norm(fresh(hidden), residual, weight, eps, rows=samples)
