"""The /dev/shm weight store: layout, zero-copy attach across processes, ownership and reclaim."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rempd.model.config import ModelConfig
from rempd.shm_store import (Manifest, StoreError, StoreNotFoundError, WeightStore,
                             load_into_store, new_segment_name, reclaim_stale_segments)
from rempd.shm_store.loader import copy_transposed
from rempd.shm_store.manifest import SegmentHeader
from rempd.shm_store.segments import shm_path

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm")

REPO = Path(__file__).resolve().parents[1]


def _row_parallel(name: str) -> bool:
    return name.endswith(("o_proj.weight", "down_proj.weight"))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(3, 4, 2, generator=g).half(),
        "bf16": torch.randn(9, generator=g).bfloat16(),
        "layers.0.self_attn.o_proj.weight": torch.randn(6, 10, generator=g).bfloat16(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _child_read(name: str, queue: "mp.Queue") -> None:
    store = WeightStore.attach(name)
    out = {n: (tuple(store.tensor(n).shape), str(store.tensor(n).dtype), _raw(store.tensor(n)))
           for n in store.names()}
    out["rows"] = (None, None, _raw(store.rows("layers.0.self_attn.o_proj.weight", 2, 5)))
    store.close()
    queue.put(out)


def _child_own_then_hang(name: str, queue: "mp.Queue") -> None:
    store = WeightStore.create(_tensors().items(), name=name)   # keep it: dropping it unlinks
    queue.put(store.name)
    time.sleep(60)


def _spawn(target, *args) -> tuple[mp.Process, "mp.Queue"]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue), daemon=True)
    proc.start()
    return proc, queue


def test_spawned_child_reads_identical_values_and_exit_keeps_segment():
    tensors = _tensors()
    with WeightStore.create(tensors.items(), transpose=_row_parallel) as store:
        proc, queue = _spawn(_child_read, store.name)
        got = queue.get(timeout=120)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        for n, t in tensors.items():
            stored = t.t() if n.endswith("o_proj.weight") else t
            assert got[n][0] == tuple(stored.shape) and got[n][1] == str(t.dtype)
            assert got[n][2] == _raw(stored), n
        assert got["rows"][2] == _raw(tensors["layers.0.self_attn.o_proj.weight"].t()[2:5])
        time.sleep(0.2)
        assert store.path.exists()            # the attaching child's exit did not unlink it
        assert torch.equal(WeightStore.attach(store.name).tensor("f32"), tensors["f32"])


def test_fresh_interpreter_with_resource_tracker_does_not_unlink():
    # A separate process tree has its own resource tracker, which (Python < 3.13) unlinks
    # every segment SharedMemory() registered when it shuts down.
    with WeightStore.create(_tensors().items()) as store:
        code = ("import sys; from multiprocessing import resource_tracker as rt; rt.ensure_running();"
                "from rempd.shm_store import WeightStore;"
                f"s = WeightStore.attach({store.name!r}); print(float(s.tensor('f32').sum()))")
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert float(res.stdout) == pytest.approx(float(_tensors()["f32"].sum()), rel=1e-5)
        time.sleep(0.5)                      # the tracker cleans up just after its parent exits
        assert store.path.exists()


def test_attached_mapping_is_read_only():
    with WeightStore.create(_tensors().items()) as store:
        code = ("from rempd.shm_store import WeightStore;"
                f"WeightStore.attach({store.name!r}).tensor('f32').add_(1)")
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             timeout=120)
        assert res.returncode == -signal.SIGSEGV
        assert torch.equal(store.tensor("f32"), _tensors()["f32"])


def test_transposed_layout_gives_contiguous_row_slices():
    w = torch.arange(6 * 10, dtype=torch.float32).view(6, 10)   # [out, in] as nn.Linear keeps it
    name = "model.layers.0.mlp.down_proj.weight"
    with WeightStore.create([(name, w), ("q.weight", w)], transpose=_row_parallel) as store:
        e = store.entry(name)
        assert e.transposed and e.shape == (10, 6) and e.checkpoint_shape == (6, 10)
        assert not store.entry("q.weight").transposed
        assert torch.equal(store.tensor(name), w.t())
        for tp in (1, 2, 5):
            per = 10 // tp
            for r in range(tp):
                part = store.rows(name, r * per, (r + 1) * per)
                assert part.is_contiguous() and torch.equal(part, w[:, r * per:(r + 1) * per].t())
        assert store.entry(name).offset % 4096 == 0 and store.entry("q.weight").offset % 4096 == 0
        with pytest.raises(StoreError, match="out of range"):
            store.rows(name, 4, 11)


def test_threaded_transpose_copy_matches():
    src = torch.randn(3000, 1001)                       # 12 MB: big enough for the thread pool
    dst = torch.empty(1001, 3000)
    copy_transposed(dst, src, threads=3, block_rows=256)
    assert torch.equal(dst, src.t())


def test_reclaim_dead_owner_keeps_live_ones():
    live = WeightStore.create(_tensors().items())
    dead_name = new_segment_name()
    proc, queue = _spawn(_child_own_then_hang, dead_name)
    try:
        assert queue.get(timeout=120) == dead_name
        assert WeightStore.exists(dead_name) and WeightStore.exists(live.name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert WeightStore.exists(dead_name)          # SIGKILL ran no cleanup
        reclaimed = reclaim_stale_segments()
        assert dead_name in reclaimed and live.name not in reclaimed
        assert not WeightStore.exists(dead_name) and WeightStore.exists(live.name)
    finally:
        proc.kill()
        shm_path(dead_name).unlink(missing_ok=True)
        live.unlink()


def test_reclaim_detects_reused_pid():
    with WeightStore.create(_tensors().items()) as store:
        # Our pid is alive, but a different start time means the owner was another process.
        forged = SegmentHeader(store.header.state, os.getpid(), store.header.owner_start - 1,
                               store.header.manifest_len, store.header.data_offset,
                               store.header.data_bytes)
        with open(store.path, "r+b") as f:
            f.write(forged.pack())
        assert store.name in reclaim_stale_segments()
        assert not store.path.exists()


def test_unlink_and_context_manager_remove_the_segment():
    store = WeightStore.create(_tensors().items())
    attached = WeightStore.attach(store.name)
    view = attached.tensor("f32")
    with pytest.raises(StoreError, match="only its owner"):
        attached.unlink()
    store.unlink()
    assert not store.path.exists() and not WeightStore.exists(store.name)
    attached.close()
    assert torch.equal(view, _tensors()["f32"])     # views outlive close() and unlink()
    with pytest.raises(StoreError, match="closed"):
        attached.tensor("f32")
    with WeightStore.create(_tensors().items()) as owned:
        path = owned.path
    assert not path.exists()


def test_same_model_twice_does_not_collide():
    with WeightStore.create(_tensors().items()) as a, WeightStore.create(_tensors().items()) as b:
        assert a.name != b.name and a.path.exists() and b.path.exists()
        assert a.name.startswith(f"remp-{os.getuid()}-{os.getpid()}-")
        with pytest.raises(StoreError, match="already exists"):
            WeightStore.create(_tensors().items(), name=a.name)
        assert a.path.exists()                      # the failed create left the original alone


def test_attach_errors():
    with pytest.raises(StoreNotFoundError, match="no weight store"):
        WeightStore.attach(new_segment_name())
    with pytest.raises(StoreError, match="invalid"):
        WeightStore.attach("../etc/passwd")
    with WeightStore.build([("a", (2,), "float32")]) as builder:
        with pytest.raises(StoreError, match="still being loaded"):
            WeightStore.attach(builder.name)
        builder.write("a", torch.ones(2))
        builder.finish().unlink()


def test_builder_rejects_bad_writes_and_cleans_up():
    with pytest.raises(StoreError, match="never written"):
        with WeightStore.build([("a", (2, 3), "F32"), ("b", (4,), "bfloat16")]) as builder:
            path = builder.path
            with pytest.raises(StoreError, match="specs said"):
                builder.write("a", torch.ones(3, 2))
            with pytest.raises(StoreError, match="not in the specs"):
                builder.write("c", torch.ones(2, 3))
            builder.write("a", torch.ones(2, 3))
            with pytest.raises(StoreError, match="twice"):
                builder.write("a", torch.ones(2, 3))
            builder.finish()
    assert not path.exists()


def test_manifest_json_round_trip():
    m = Manifest.plan([("w.o_proj.weight", (4, 8), "torch.bfloat16"), ("n", (8,), "float32")],
                      _row_parallel, {"config": {"hidden_size": 8}})
    assert Manifest.from_json(m.to_json()) == m
    assert m["w.o_proj.weight"].shape == (8, 4) and m["n"].offset == 4096
    assert m.total_bytes == 2 * 4096 and m.tensor_bytes == 64 + 32
    with pytest.raises(StoreError, match="corrupt manifest"):
        Manifest.from_json("{}")


class _StandInCheckpoint:
    """What rempd.model.checkpoint.Checkpoint offers the loader."""

    def __init__(self) -> None:
        self.config = ModelConfig.from_dict({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
            "torch_dtype": "bfloat16"})
        self.model_dir = "/tmp/tiny-llama"
        g = torch.Generator().manual_seed(1)
        p = "model.layers.0."
        shapes = {"model.embed_tokens.weight": (32, 8), p + "self_attn.o_proj.weight": (8, 8),
                  p + "mlp.down_proj.weight": (8, 12), p + "mlp.up_proj.weight": (12, 8)}
        self.tensors = {n: torch.randn(*s, generator=g).bfloat16() for n, s in shapes.items()}

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [(n, tuple(t.shape), "bfloat16") for n, t in self.tensors.items()]

    def iter_tensors(self):
        yield from self.tensors.items()


def test_load_into_store_streams_with_progress():
    ckpt = _StandInCheckpoint()
    progress: list[tuple[int, int]] = []
    with load_into_store(ckpt, on_progress=lambda done, total: progress.append((done, total))) as store:
        total = sum(t.nbytes for t in ckpt.tensors.values())
        assert progress[0] == (0, total) and progress[-1] == (total, total)
        assert [d for d, _ in progress] == sorted(d for d, _ in progress)
        assert store.load_stats.nbytes == total and store.load_stats.tensors == 4
        attached = WeightStore.attach(store.name)
        assert attached.manifest.model_info["config"]["hidden_size"] == 8
        assert attached.manifest.model_info["checkpoint"] == "/tmp/tiny-llama"
        for n, t in ckpt.tensors.items():
            assert attached.entry(n).transposed == _row_parallel(n)
            assert torch.equal(attached.tensor(n), t.t() if _row_parallel(n) else t)
