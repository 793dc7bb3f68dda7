"""The start-up visit of every other TP size that uses all devices (engine/links.warm_first_captures): on GPUs it
pays each TP size's first decode-graph capture before any live switch. Here, on 4 gloo workers, it must come back
to the placement it left, with the same KV pool and the same greedy tokens, and stay out of the history."""
from rempd import LLM, SamplingParams
from rempd.engine.links import warm_first_captures

PROMPTS = [f"Stream {i}: hello" for i in range(3)]


def test_the_visit_of_other_tp_sizes_comes_back_with_the_same_pool_and_tokens(checkpoints):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(checkpoints["tiny-llama"], tp=1, pp=4, cpu_workers=4) as llm:
        engine = llm.engine
        before = [o.token_ids for o in llm.generate(PROMPTS, params)]
        home, blocks = engine.placement, engine.scheduler.blocks.num_blocks
        assert warm_first_captures(engine) == [2, 4]
        assert engine.placement == home and engine.scheduler.blocks.num_blocks == blocks
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == before
        assert not engine.switches
