import torch

from rempd.engine.sampler import sample
from rempd.engine.step_input import SampleSpec


def spec(temperature=1.0, top_k=0, top_p=1.0, seed=7, index=0):
    return SampleSpec(temperature, top_k, top_p, seed, index)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [spec(0.0), spec(0.0)]) == [1, 0]


def test_seeded_sampling_is_a_function_of_seed_and_index():
    logits = torch.randn(1, 100)
    runs = [sample(logits, [spec(seed=3, index=i)]) for i in range(20)]
    assert runs == [sample(logits, [spec(seed=3, index=i)]) for i in range(20)]
    assert runs != [sample(logits, [spec(seed=4, index=i)]) for i in range(20)]
    assert len({tuple(r) for r in runs}) > 1  # the index moves the stream


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0]])
    picked_k = {sample(logits, [spec(top_k=2, seed=s)])[0] for s in range(200)}
    assert picked_k == {0, 1}
    picked_p = {sample(logits, [spec(top_p=0.3, seed=s)])[0] for s in range(200)}
    assert picked_p == {0}


def test_greedy_rows_travel_without_a_spec():
    logits = torch.randn(3, 50)
    mixed = [None, spec(seed=5), None]
    assert sample(logits, mixed) == sample(logits, [spec(0.0), spec(seed=5), spec(0.0)])
    assert sample(logits, mixed)[0] == int(logits[0].argmax())
