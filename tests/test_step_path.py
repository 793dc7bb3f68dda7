"""The driver→worker step path: packing a step for the GPU path (padding rules of the CUDA-graph buckets) and the
shared-memory ring the driver writes steps to."""
import numpy as np
import torch

from rempd.engine.step_input import SampleSpec, StepInput
from rempd.worker_pool.cuda_graphs import buckets_up_to
from rempd.worker_pool.step_channel import SHM_DIR, StepChannel
from rempd.worker_pool.step_tensors import StepLayout


def decode_step(n: int) -> StepInput:
    return StepInput(token_ids=[10 + i for i in range(n)], positions=[20 + i for i in range(n)],
                     slot_mapping=[100 + i for i in range(n)], query_lens=[1] * n, context_lens=[21 + i for i in range(n)],
                     block_tables=[[i, i + 1] for i in range(n)], sample_indices=list(range(n)),
                     samples=[SampleSpec(0.0, 0, 1.0, 1, 0)] * n)


def test_pack_pads_to_the_bucket():
    layout = StepLayout(tokens=4, samples=4, seqs=4, max_blocks=3)
    flat = torch.from_numpy(layout.pack(decode_step(3)))
    ids, positions, samples, meta = layout.unpack(flat, max_query_len=1)
    assert ids.tolist() == [10, 11, 12, 0] and positions.tolist() == [20, 21, 22, 0]
    assert meta.slot_mapping.tolist() == [100, 101, 102, -1]  # the padding token writes nothing
    assert meta.context_lens.tolist() == [21, 22, 23, 0]  # and its sequence reads nothing
    assert meta.query_start.tolist() == [0, 1, 2, 3, 4] and samples.tolist() == [0, 1, 2, 3]
    assert meta.block_tables.tolist() == [[0, 1, 0], [1, 2, 0], [2, 3, 0], [0, 0, 0]]


def test_pack_of_a_mixed_step_keeps_its_shape():
    step = StepInput([1, 2, 3, 4], [0, 1, 2, 7], [5, 6, 7, 40], [3, 1], [3, 8], [[0], [2]], [2, 3], [])
    layout = StepLayout.of(step)
    _, _, samples, meta = layout.unpack(torch.from_numpy(layout.pack(step)), 3)
    assert meta.query_start.tolist() == [0, 3, 4] and samples.tolist() == [2, 3]
    assert meta.slot_mapping.tolist() == [5, 6, 7, 40] and meta.block_tables.tolist() == [[0], [2]]


def test_buckets():
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_up_to(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets_up_to(1) == [1]


def test_channel_ring_wraps_and_large_steps_go_inline():
    driver = StepChannel.create(size=64 << 10)
    reader = StepChannel.attach(driver.name)
    driver.unlink()
    assert not (SHM_DIR / driver.name).exists()  # mapped, so nameless from now on
    try:
        refs = [(i, driver.write(decode_step(i % 40 + 1))) for i in range(200)]
        assert sum(r[1] for _, r in refs) > 64 << 10  # the ring wrapped
        for i, ref in refs[-8:]:
            assert isinstance(ref, tuple) and reader.read(ref) == decode_step(i % 40 + 1)
        big = driver.write(np.zeros(10_000))
        assert isinstance(big, bytes) and reader.read(big).shape == (10_000,)
    finally:
        reader.close()
        driver.close()


def test_pack_of_ragged_block_tables():
    step = StepInput([1, 2, 3], [40, 5, 20], [640, 85, 340], [1, 1, 1], [41, 6, 21], [[4, 7, 9], [5], [2, 8]],
                     [0, 1, 2], [None] * 3)
    layout = StepLayout(tokens=4, samples=4, seqs=4, max_blocks=4)
    meta = layout.unpack(torch.from_numpy(layout.pack(step)), 1)[3]
    assert meta.block_tables.tolist() == [[4, 7, 9, 0], [5, 0, 0, 0], [2, 8, 0, 0], [0, 0, 0, 0]]
