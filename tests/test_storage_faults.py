"""Storage faults: a disk that fills while `rempd make-checkpoint` writes, and checkpoints that are truncated or
whose config disagrees with the tensors, given to a real `rempd serve`: clean errors, nothing left behind."""
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fault_tools import store_segments

FULL_AT = 200_000  # bytes: tiny-llama's weights are larger, so the write fails part-way


def small_disk():
    # what a full disk does to a writer, without mounting anything: writes past this size fail (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_AT, FULL_AT))


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_a_full_disk_during_make_checkpoint_is_a_clean_error_leaving_nothing(tmp_path, existing):
    out = tmp_path / "ckpt"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("the operator's file stays")
    run = subprocess.run([sys.executable, "-m", "rempd", "make-checkpoint", "--shape", "tiny-llama", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "cannot write the checkpoint" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def truncate(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "not a readable safetensors file"


def inconsistent_shapes(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8  # the MLP tensors no longer match the config
    (model / "config.json").write_text(json.dumps(config))
    return "shape"


@pytest.mark.parametrize("damage", [truncate, inconsistent_shapes], ids=lambda f: f.__name__)
def test_serve_refuses_a_damaged_checkpoint_cleanly(checkpoints, tmp_path, damage):
    import shutil

    model = tmp_path / "tiny-llama"
    shutil.copytree(checkpoints["tiny-llama"], model)
    expected = damage(model)
    sock = tmp_path / "rempd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "rempd", "serve", "--model", str(model), "--cpu-workers", "2",
                             "--port", "0", "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output
    assert expected in output.lower() and "Traceback" not in output, output
    assert not sock.exists() and not store_segments(proc.pid)
