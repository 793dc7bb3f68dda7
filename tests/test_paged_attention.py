"""The Triton paged-attention kernels against the reference path, on CPU through Triton's interpreter.
Skipped where Triton is not installed; the GPU tests run the same kernels compiled."""
import os

import pytest
import torch

if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are defined
pytest.importorskip("triton")

from rempd.model.attention import AttentionMetadata, paged_attention, write_kv  # noqa: E402
from rempd.model.paged_attention import KernelMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_step(query_lens: list[int], context_lens: list[int], block_size: int, num_blocks: int, seed: int):
    """Random block tables (disjoint, shuffled) and the slots of each sequence's new tokens."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots = [], []
    for q_len, ctx in zip(query_lens, context_lens):
        count = -(-ctx // block_size)
        table, order = order[:count], order[count:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
    return tables, slots


KERNEL_CASES = [
    ([1, 1, 1], [1, 17, 40], 4, 2),  # decode, GQA
    ([5, 1, 23], [5, 30, 70], 4, 4),  # prefill, decode and a chunk on top of cached context
    ([7, 1], [20, 33], 6, 1),  # replicated KV head: a group of 6 (not a power of two)
    ([1, 1, 1, 1], [300, 5, 129, 128], 6, 2),  # split-KV decode: 3 splits of 128 keys, contexts at their edges
]


# decode steps also with split-KV off; a step with prefill never splits, so it runs once
@pytest.mark.parametrize("query_lens, context_lens, heads, kv_heads, split_kv", [
    (*case, split) for case in KERNEL_CASES for split in ([True, False] if max(case[0]) == 1 else [True])])
def test_kernels_match_reference(query_lens, context_lens, heads, kv_heads, split_kv, monkeypatch):
    if not split_kv:
        monkeypatch.setenv("REMPD_SPLIT_KV", "0")
    torch.manual_seed(0)
    head_dim, block_size, num_blocks, dtype = 16, 16, 48, torch.float32
    tables, slots = make_step(query_lens, context_lens, block_size, num_blocks, seed=1)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    tokens = sum(query_lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))  # strided rows, as the model hands them over

    ref_cache = cache.clone()
    ref_meta = AttentionMetadata.build(slots, tables, query_lens, context_lens, block_size, torch.device("cpu"))
    write_kv(ref_cache[0], ref_cache[1], k, v, ref_meta.slot_mapping)
    expected = paged_attention(q.contiguous(), ref_cache[0], ref_cache[1], ref_meta, 0.3)

    kv, width = cache.to(DEVICE), max(8, *map(len, tables))
    meta = KernelMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
        query_start=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=DEVICE),
        context_lens=torch.tensor(context_lens, device=DEVICE), max_query_len=max(query_lens))
    meta.store(kv[0], kv[1], k.to(DEVICE), v.to(DEVICE))  # with the fused ops on, rotary writes: test_fused_ops
    assert torch.equal(kv.cpu(), ref_cache)
    got = meta.attend(q.to(DEVICE), kv[0], kv[1], 0.3).cpu()  # strided rows, as the model hands q over
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split_kv", [True, False])
def test_padding_rows_write_nothing_and_read_nothing(split_kv, monkeypatch):
    """A CUDA-graph bucket pads the batch with slot -1 and context 0: the cache is untouched, outputs are 0."""
    if not split_kv:
        monkeypatch.setenv("REMPD_SPLIT_KV", "0")
    head_dim, block_size = 16, 16
    kv = torch.randn(2, 4, block_size, 2, head_dim, device=DEVICE)
    before = kv.clone()
    meta = KernelMetadata(slot_mapping=torch.tensor([21, -1, -1], device=DEVICE),
                          block_tables=torch.tensor([[1], [0], [0]], device=DEVICE),
                          query_start=torch.arange(4, device=DEVICE),
                          context_lens=torch.tensor([6, 0, 0], device=DEVICE), max_query_len=1)
    k = torch.randn(3, 2, head_dim, device=DEVICE)
    meta.store(kv[0], kv[1], k, k)
    changed = (kv != before).any(-1).any(-1).nonzero().tolist()
    assert changed == [[0, 1, 5], [1, 1, 5]]
    out = meta.attend(torch.randn(3, 4, head_dim, device=DEVICE), kv[0], kv[1], 0.25)
    assert out[1:].abs().max().item() == 0.0 and out[0].abs().max().item() > 0


@pytest.mark.slow
def test_engine_with_kernels_matches_reference(checkpoints):
    """The whole model on the kernel path (CPU workers, interpreted kernels): chunked prefill, a batch of decodes,
    TP2 with its KV heads split; same greedy tokens and close logits as the reference path."""
    from rempd import LLM, SamplingParams

    prompts = [[1 + (7 * i + j) % 500 for j in range(n)] for i, n in enumerate((3, 37, 20))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for attention in ("reference", "triton"):
        with LLM(checkpoints["tiny-llama"], tp=2, attention=attention, max_num_batched_tokens=32) as llm:
            assert all(info["kernels"] == (attention == "triton") for info in llm.engine.shard_infos)
            assert llm.engine.status()["kernel_warm_s"] == 0.0  # CPU workers compile nothing at start-up
            results[attention] = ([o.token_ids for o in llm.generate(prompts, params)],
                                  llm.engine.score(prompts[1]))
    assert results["triton"][0] == results["reference"][0]
    torch.testing.assert_close(results["triton"][1], results["reference"][1], atol=1e-4, rtol=1e-4)
