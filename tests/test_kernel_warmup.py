"""The start-up kernel warm-up (worker_pool/kernel_warmup.py): on CPU through Triton's interpreter, every TP size
of a 4-device daemon runs each kernel wrapper of the decode and prefill paths; CPU workers skip it. Whether it
removes compilation from a GPU switch is the lead's GPU check (graph_capture of a first switch into a TP size)."""
import os
from collections import defaultdict

import pytest
import torch

if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are defined
pytest.importorskip("triton")

from rempd.model import paged_attention  # noqa: E402
from rempd.model.config import ModelConfig  # noqa: E402
from rempd.model.fused_ops import FusedOps  # noqa: E402
from rempd.model.paged_attention import KernelMetadata  # noqa: E402
from rempd.topology import valid_topologies  # noqa: E402
from rempd.worker_pool.kernel_warmup import WarmupShape, run_warmup, warm_kernels  # noqa: E402

# 4 heads over 2 KV heads: TP 4 replicates KV heads; an intermediate size of 42 splits 11/11/11/9 at TP 4
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64, intermediate_size=42,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                  rope_theta=10000.0)
SHAPE = WarmupShape(block_size=4, max_len=32, max_batch=4)


def spy_on_wrappers(monkeypatch) -> dict[str, list]:
    """Record each wrapper call (by the TP-dependent sizes it saw), then run the real wrapper."""
    calls: dict[str, list] = defaultdict(list)
    rotate, silu, norm = FusedOps.rotate_and_store, FusedOps.silu_mul, FusedOps.add_rms_norm
    attend, split = KernelMetadata.attend, KernelMetadata._attend_split

    def spy_rotate(qkv, positions, rotary, meta, kv, q_width, kv_width, head_dim):
        calls["rotate_and_store"].append((q_width, kv_width))
        return rotate(qkv, positions, rotary, meta, kv, q_width, kv_width, head_dim)

    def spy_silu(gate_up):
        calls["silu_mul"].append(gate_up.shape[1] // 2)
        return silu(gate_up)

    def spy_norm(x, residual, weight, eps, rows=None):
        calls["add_rms_norm"].append((residual is not None, rows is not None))
        return norm(x, residual, weight, eps, rows)

    def spy_attend(self, q, k_cache, v_cache, scale):
        calls["attend"].append((q.shape[1], self.max_query_len > 1))
        return attend(self, q, k_cache, v_cache, scale)

    def spy_split(self, q, *args):
        calls["split"].append(q.shape[1])
        return split(self, q, *args)

    monkeypatch.setattr(FusedOps, "rotate_and_store", staticmethod(spy_rotate))
    monkeypatch.setattr(FusedOps, "silu_mul", staticmethod(spy_silu))
    monkeypatch.setattr(FusedOps, "add_rms_norm", staticmethod(spy_norm))
    monkeypatch.setattr(KernelMetadata, "attend", spy_attend)
    monkeypatch.setattr(KernelMetadata, "_attend_split", spy_split)
    return calls


def test_warmup_runs_every_wrapper_for_every_tp_size(monkeypatch):
    # a low split bound: the buckets 1, 2, 4 then split at TP 1 for batch 1 and 2 only, unsplit at 4
    monkeypatch.setattr(paged_attention, "SPLIT_KV_BELOW", 4)
    calls = spy_on_wrappers(monkeypatch)
    tp_sizes = sorted({t.tp for t in valid_topologies(4, CFG.num_heads, CFG.num_kv_heads, CFG.num_layers)})
    assert tp_sizes == [1, 2, 4]
    run_warmup(CFG, torch.float32, torch.device("cpu"), tp_sizes, SHAPE)

    # per TP size: q heads, KV heads per rank (replicated at TP 4), and the ranks' intermediate widths
    expected = {1: (4, 2, {42}), 2: (2, 1, {21}), 4: (1, 1, {11, 9})}
    for tp, (q_heads, kv_heads, widths) in expected.items():
        assert (q_heads * 16, kv_heads * 16) in calls["rotate_and_store"], tp
        decode = calls["attend"].count((q_heads, False))
        assert decode > calls["split"].count(q_heads) > 0, f"TP {tp}: split-KV and unsplit decode both run"
        assert (q_heads, True) in calls["attend"], f"TP {tp}: a prefill chunk runs"
    # the ranks of TP 4 differ in width: both are warmed
    assert set(calls["silu_mul"]) == {42, 21, 11, 9}
    assert {(False, False), (True, False), (True, True)} <= set(calls["add_rms_norm"])


def test_store_kernel_is_warmed_when_fused_ops_are_off(monkeypatch):
    monkeypatch.setenv("REMPD_FUSED_OPS", "0")
    monkeypatch.setattr(paged_attention, "SPLIT_KV_BELOW", 4)  # a short unsplit decode step for the interpreter
    stored = []
    store = KernelMetadata.store

    def spy_store(self, k_cache, v_cache, k, v):
        stored.append(k.shape[1])
        return store(self, k_cache, v_cache, k, v)

    monkeypatch.setattr(KernelMetadata, "store", spy_store)
    run_warmup(CFG, torch.float32, torch.device("cpu"), [1], WarmupShape(block_size=4, max_len=8, max_batch=1))
    assert stored and set(stored) == {2}


@pytest.mark.parametrize("kernels", [False, True])
def test_cpu_workers_skip_the_warmup(monkeypatch, kernels):
    """Reference attention (CPU workers) launches no kernel; the interpreter (kernels on CPU) compiles none."""
    calls = spy_on_wrappers(monkeypatch)
    assert warm_kernels(CFG, torch.float32, torch.device("cpu"), kernels, [1, 2, 4], SHAPE) == 0.0
    assert not calls
