"""What the GPU test modules share besides their fixtures (llama1b, fp32_reference: conftest.py): the requests
they run and the float32 engine settings."""
import pytest
import torch

from rempd import SamplingParams

# Kernel and CUDA-graph paths against the reference attention. float32 makes the comparison exact enough for
# greedy tokens to be equal (bf16 near-ties could flip one); bf16 is covered against transformers (test_gpu.py).
PROMPTS = [[128000] + [(53 * i + 7 * j) % 120000 + 100 for j in range(n)] for i, n in enumerate((4, 40, 130, 300, 9, 61))]
GREEDY_LONG = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LIVE_THROUGH = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
FP32 = dict(dtype="float32", max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=16)


def need_gpus(count: int) -> None:
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs, found {torch.cuda.device_count()}")
