"""The fused Triton ops of the kernel path against their PyTorch reference, on CPU through Triton's interpreter.
Skipped where Triton is not installed; the GPU tests run the same kernels compiled inside the whole model."""
import os

import pytest
import torch

if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are defined
pytest.importorskip("triton")

from rempd.model.attention import AttentionMetadata  # noqa: E402
from rempd.model.config import ModelConfig  # noqa: E402
from rempd.model.fused_ops import FusedOps, ReferenceOps, ops_for  # noqa: E402
from rempd.model.paged_attention import KernelMetadata  # noqa: E402
from rempd.model.rotary import Rotary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32: only the order of a sum may differ; compiled, exp and rsqrt are the GPU's approximations
EXACT = dict(atol=1e-6, rtol=1e-6) if DEVICE.type == "cpu" else dict(atol=1e-5, rtol=1e-5)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit under the interpreter; within one float16 rounding where the GPU's approximations run."""
    if DEVICE.type == "cpu":
        assert torch.equal(got.cpu(), want)
    else:
        torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)


def on_device(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("width, with_residual, rows", [
    (48, True, None),  # the residual add fused in; width not a power of two
    (64, False, None),  # a stage's first layer: plain norm, the input is the residual
    (48, True, [4, 0, 2]),  # the last stage's final norm, on the sampled rows only
    (32, False, [1]),
])
def test_add_rms_norm(width, with_residual, rows):
    torch.manual_seed(0)
    x, residual, weight = torch.randn(5, width) * 3, torch.randn(5, width), torch.rand(width) + 0.5
    residual = residual if with_residual else None
    rows = None if rows is None else torch.tensor(rows)
    want_out, want_residual = ReferenceOps.add_rms_norm(x, residual, weight, 1e-5, rows=rows)
    got_out, got_residual = FusedOps.add_rms_norm(*on_device(x, residual, weight), 1e-5, rows=on_device(rows)[0])
    torch.testing.assert_close(got_out.cpu(), want_out, **EXACT)
    assert torch.equal(got_residual.cpu(), want_residual)  # one float32 add: bit for bit


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (6, 1, 8), (3, 3, 12)])
def test_rotate_and_store(heads, kv_heads, head_dim):
    """q rotated in place in the projection output; k rotated and v copied into the cache at the token's slot;
    a padding token (slot -1) writes nothing."""
    torch.manual_seed(1)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=heads * head_dim,
                      intermediate_size=8, num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=64, rope_theta=10000.0)
    q_width, kv_width, block_size = heads * head_dim, kv_heads * head_dim, 4
    qkv = torch.randn(7, q_width + 2 * kv_width)
    positions = torch.tensor([0, 5, 63, 1, 17, 17, 40])
    slots = [9, 0, 22, 3, 14, 13, -1]
    cache = torch.randn(2, 6, block_size, kv_heads, head_dim)
    # the reference stores the padding token in slot 23, which is then put back as it was
    ref_cache, ref_slots = cache.clone(), torch.tensor(slots[:-1] + [23])
    ref_meta = AttentionMetadata(ref_slots, *[None] * 5)  # store() reads only the slots
    want = ReferenceOps.rotate_and_store(qkv, positions, Rotary(cfg, 64, torch.device("cpu")), ref_meta, ref_cache,
                                         q_width, kv_width, head_dim)
    ref_cache.view(2, -1, kv_heads, head_dim)[:, 23] = cache.view(2, -1, kv_heads, head_dim)[:, 23]
    fused_qkv, fused_cache = qkv.clone().to(DEVICE), cache.clone().to(DEVICE)
    meta = KernelMetadata(torch.tensor(slots, device=DEVICE), *[None] * 3, max_query_len=1)
    got = FusedOps.rotate_and_store(fused_qkv, positions.to(DEVICE), Rotary(cfg, 64, DEVICE), meta, fused_cache,
                                    q_width, kv_width, head_dim)
    assert got.shape == (7, heads, head_dim) and got.data_ptr() == fused_qkv.data_ptr()  # a view: no copy
    torch.testing.assert_close(got.cpu(), want, **EXACT)
    torch.testing.assert_close(fused_cache.cpu(), ref_cache, **EXACT)


@pytest.mark.parametrize("width, tokens", [(40, 3), (1100, 2)])  # 1100: more than one column tile
def test_silu_mul(width, tokens):
    torch.manual_seed(2)
    gate_up = torch.randn(tokens, 2 * width) * 4
    torch.testing.assert_close(FusedOps.silu_mul(gate_up.to(DEVICE)).cpu(), ReferenceOps.silu_mul(gate_up),
                               **EXACT)


def test_half_precision_rounds_where_the_reference_rounds():
    """In float16 the kernels round the sum, the normalised row and silu's output as PyTorch does: bit for bit.
    (bfloat16 is left to the GPU tests: the interpreter truncates bfloat16 where the GPU rounds to nearest.)"""
    torch.manual_seed(3)
    x, residual = (torch.randn(4, 48) * 3).half(), torch.randn(4, 48).half()
    weight, gate_up = (torch.rand(48) + 0.5).half(), (torch.randn(3, 80) * 4).half()
    got = FusedOps.add_rms_norm(*on_device(x, residual, weight), 1e-5)
    for g, w in zip(got, ReferenceOps.add_rms_norm(x, residual, weight, 1e-5)):
        assert_same(g, w)
    assert_same(FusedOps.silu_mul(gate_up.to(DEVICE)), ReferenceOps.silu_mul(gate_up))


def test_fused_ops_run_with_the_kernels_unless_turned_off(monkeypatch):
    kernel_meta = KernelMetadata(*[torch.zeros(1, dtype=torch.long)] * 4, max_query_len=1)
    assert ops_for(kernel_meta) is FusedOps
    assert ops_for(AttentionMetadata(*[None] * 6)) is ReferenceOps
    monkeypatch.setenv("REMPD_FUSED_OPS", "0")
    assert ops_for(kernel_meta) is ReferenceOps
