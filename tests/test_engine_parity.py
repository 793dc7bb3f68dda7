"""The engine against Hugging Face transformers, at every topology of up to 4 gloo workers."""
import pytest
import torch

from rempd import LLM, SamplingParams

TOPOLOGIES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 120, 64, 33]
BATCH = [[(7 * i + 3 * j) % 400 + 1 for j in range(3 + 5 * i)] for i in range(8)]  # 8 lengths: 3..38
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """HF logits and HF greedy continuation of PROMPT, per model."""
    from transformers import AutoModelForCausalLM

    refs = {}
    for shape, path in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            logits = model(ids).logits[0]
            out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 pad_token_id=0)[0, len(PROMPT):]
        refs[shape] = (logits, out.tolist())
    return refs


@pytest.fixture(scope="module")
def runs(checkpoints):
    """Every model at every topology: prompt logits, one greedy request, and a batch of 8."""
    results = {}
    for shape, path in checkpoints.items():
        for tp, pp in TOPOLOGIES:
            with LLM(path, tp=tp, pp=pp, cpu_workers=4, max_num_batched_tokens=64) as llm:
                logits = llm.engine.score(PROMPT)
                single = llm.generate([PROMPT], GREEDY)[0].token_ids
                batch = [o.token_ids for o in llm.generate(BATCH, GREEDY)]
            results[shape, tp, pp] = (logits, single, batch)
    return results


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("tp, pp", TOPOLOGIES)
def test_logits_match_transformers(runs, reference, shape, tp, pp):
    logits, _, _ = runs[shape, tp, pp]
    torch.testing.assert_close(logits, reference[shape][0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_greedy_tokens_identical_across_topologies(runs, reference, shape):
    baseline = runs[shape, 1, 1]
    assert baseline[1] == reference[shape][1]
    for tp, pp in TOPOLOGIES:
        _, single, batch = runs[shape, tp, pp]
        assert single == baseline[1], (tp, pp)
        assert batch == baseline[2], (tp, pp)
    # a request inside a batch gets what it gets alone
    assert baseline[2][1] == runs[shape, 1, 1][2][1]


def test_uneven_pipeline_split(checkpoints, reference):
    """tiny-qwen2 has 5 layers: PP2 puts 3 on the first stage and 2 on the second."""
    with LLM(checkpoints["tiny-qwen2"], tp=1, pp=2, cpu_workers=2) as llm:
        assert [len(r) for r in (range(0, 3), range(3, 5))] == [3, 2]
        torch.testing.assert_close(llm.engine.score(PROMPT), reference["tiny-qwen2"][0], atol=2e-5, rtol=1e-4)


def test_batch_member_equals_request_alone(checkpoints):
    with LLM(checkpoints["tiny-llama"], tp=2, pp=2, cpu_workers=4) as llm:
        together = [o.token_ids for o in llm.generate(BATCH, GREEDY)]
        alone = [llm.generate([prompt], GREEDY)[0].token_ids for prompt in BATCH[::3]]
    assert together[::3] == alone


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_preemption_by_recompute_keeps_greedy_tokens(checkpoints, runs, tp, pp):
    """A pool of 12 blocks of 16 tokens cannot hold 8 sequences of up to 50 tokens: some must be recomputed."""
    path = checkpoints["tiny-llama"]
    layers, kv_heads, head_dim = 4 // pp, 2 // tp, 16
    bytes_per_block = layers * 2 * 16 * kv_heads * head_dim * 4
    with LLM(path, tp=tp, pp=pp, cpu_workers=4, kv_cache_memory=12 * bytes_per_block,
             block_size=16, max_model_len=64) as llm:
        assert llm.engine.scheduler.blocks.num_blocks == 12
        batch = [o.token_ids for o in llm.generate(BATCH, GREEDY)]
        assert llm.engine.stats().num_preempted > 0
    assert batch == runs["tiny-llama", 1, 1][2]
