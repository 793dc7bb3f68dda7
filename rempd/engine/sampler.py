"""Token sampling on the output worker. Stateless per (seed, index), so a switch or a recompute cannot change it."""
from __future__ import annotations

import torch

from rempd.engine.step_input import SampleSpec

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, index: int) -> int:
    return (seed * _MIX + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def sample(logits: torch.Tensor, specs: list[SampleSpec | None]) -> list[int]:
    """logits: [len(specs), vocab] float32. A None spec is greedy."""
    return sample_on_device(logits, specs).tolist()


def sample_on_device(logits: torch.Tensor, specs: list[SampleSpec | None]) -> torch.Tensor:
    """sample() without waiting for the device: the tokens as an int64 tensor beside the logits."""
    tokens = logits.argmax(dim=-1)
    for row, spec in enumerate(specs):
        if spec is None or spec.temperature == 0.0:
            continue
        scores = logits[row] / spec.temperature
        if 0 < spec.top_k < scores.shape[0]:
            kth = torch.topk(scores, spec.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if spec.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
            # every entry written back (the dropped ones as 0): a boolean index would wait for the device
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        generator = torch.Generator(device=logits.device).manual_seed(sample_seed(spec.seed, spec.index))
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
