"""Compiling, at start-up, the Triton kernels of every TP size a worker may run, so that no switch compiles.

The kernels take per-TP-rank sizes as constexprs (rotary_store's head counts, silu_mul's width, the decode
combine's heads, paged attention's GQA group), and whether a decode step splits its keys depends on the KV heads
per rank: without this, a worker's first switch into a TP size it had not run compiles them inside the switch's
pause, in the commit's graph capture (4x H100, llama2-7b: the first switch into a TP size spent 0.22-0.44 s
capturing, later ones 0.01-0.08 s). Compiling them here cut that first capture to 0.15-0.23 s (session 5,
bench/first_switch_capture.py), so the matmuls of each rank's weight shapes run here too: cuBLAS picks and loads a
kernel per shape on first use, which a first capture in a new TP size would otherwise pay.

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
import torch.nn.functional as F

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
    vocab: tuple[int, ...]  # LM head rows of the ranks, likewise


def rank_widths(cfg: ModelConfig, tp: int) -> RankWidths:
    def widths(total: int) -> tuple[int, ...]:
        return tuple(sorted({stop - start for start, stop in (even_range(total, tp, r) for r in range(tp))} - {0}))

    return RankWidths(cfg.num_heads // tp, kv_heads_per_rank(cfg.num_kv_heads, tp), widths(cfg.intermediate_size),
                      widths(cfg.vocab_size))


@dataclass
class RankWeights:
    """Uninitialised weights of one rank's shapes, laid out as LlamaStage holds them (values do not matter)."""
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_t: torch.Tensor
    gate_up: list[torch.Tensor]  # per width in RankWidths.intermediate
    down_t: list[torch.Tensor]
    lm_head: list[torch.Tensor]  # per width in RankWidths.vocab

    @classmethod
    def empty(cls, cfg: ModelConfig, widths: RankWidths, dtype: torch.dtype, device: torch.device) -> "RankWeights":
        hidden, head_dim = cfg.hidden_size, cfg.head_dim
        qkv_rows = (widths.q_heads + 2 * widths.kv_heads) * head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        return cls(empty(qkv_rows, hidden), empty(qkv_rows) if cfg.attention_bias else None,
                   empty(widths.q_heads * head_dim, hidden), [empty(2 * w, hidden) for w in widths.intermediate],
                   [empty(w, hidden) for w in widths.intermediate], [empty(v, hidden) for v in widths.vocab])


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
        weights = RankWeights.empty(cfg, widths, dtype, device)
        for _ids, positions, samples, meta in step_inputs(shape, max_blocks, widths.kv_heads, device):
            run_layer(cfg, widths, weights, rotary, layer_kv, positions, samples, meta, dtype)
        del weights, layer_kv


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
    # 16-byte alignment (the table width, which varies, is not specialized: see triton_kernels.py)
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


def run_layer(cfg: ModelConfig, widths: RankWidths, weights: RankWeights, rotary: Rotary, kv: torch.Tensor,
              positions: torch.Tensor, samples: torch.Tensor, meta: KernelMetadata, dtype: torch.dtype) -> None:
    """The launches of DecoderLayer.forward on one rank, and the last stage's final norm and LM head, each as the
    model calls it; the all-reduces between them (warmed with the groups) only make fresh, contiguous tensors,
    as torch.zeros does here."""
    ops, device, tokens = ops_for(meta), kv.device, positions.shape[0]
    eps, head_dim, hidden = cfg.rms_norm_eps, cfg.head_dim, cfg.hidden_size
    q_width, kv_width = widths.q_heads * head_dim, widths.kv_heads * head_dim
    norm = torch.ones(hidden, dtype=dtype, device=device)

    def fresh(width: int) -> torch.Tensor:
        return torch.zeros(tokens, width, dtype=dtype, device=device)

    h, residual = ops.add_rms_norm(fresh(hidden), None, norm, eps)  # a stage's first layer
    q = ops.rotate_and_store(F.linear(h, weights.qkv, weights.qkv_bias), positions, rotary, meta, kv, q_width,
                             kv_width, head_dim)
    attn = meta.attend(q, kv[0], kv[1], head_dim ** -0.5)
    attn.flatten(1) @ weights.o_t
    h, residual = ops.add_rms_norm(fresh(hidden), residual, norm, eps)
    for gate_up, down_t in zip(weights.gate_up, weights.down_t):
        ops.silu_mul(F.linear(h, gate_up)) @ down_t
    x, _ = ops.add_rms_norm(fresh(hidden), residual, norm, eps, rows=samples)
    for lm_head in weights.lm_head:
        F.linear(x, lm_head).float()
