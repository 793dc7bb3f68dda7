"""GPU test of the workers' allocator setting (device_memory.configure_allocator): the pattern of a 70B staged
switch with give-back, then a stop-the-world switch, on one GPU. Each run is a fresh process, since the allocator
reads its setting once. CI has no GPU and skips this by marker."""
import os
import subprocess
import sys

import pytest

from gpu_setup import need_gpus

pytestmark = pytest.mark.gpu

# a pool of most of the free memory is freed; a smaller pool and a shard's rows take its room; the smaller pool and
# every other row are freed (the cut, then a switch); a pool nearly as large as the first must then fit
PATTERN = """
import torch
from rempd.worker_pool.device_memory import configure_allocator
if {configured}:
    configure_allocator()
free, _ = torch.cuda.mem_get_info(0)
pool = torch.empty(int(free * 0.7), dtype=torch.uint8, device="cuda")
del pool
small_pool = torch.empty(int(free * 0.25), dtype=torch.uint8, device="cuda")
rows = [torch.empty(200 << 20, dtype=torch.uint8, device="cuda") for _ in range(int(free * 0.3) // (200 << 20))]
del small_pool, rows[::2]
try:
    again = torch.empty(int(free * 0.6), dtype=torch.uint8, device="cuda")
    print("fits")
except torch.OutOfMemoryError:
    print("out of memory")
"""


def _run(configured: bool) -> str:
    result = subprocess.run([sys.executable, "-c", PATTERN.format(configured=configured)], capture_output=True,
                            text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_a_freed_pool_goes_back_whole_after_smaller_allocations_took_its_room():
    need_gpus(1)
    assert _run(configured=True) == "fits"
    # the default allocator splits the freed pool and cannot give its scattered room back: what went wrong before
    assert _run(configured=False) == "out of memory"
