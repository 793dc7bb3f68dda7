import os
import subprocess
import sys
from pathlib import Path

import pytest

# Four gloo workers share two cores in CI: one thread each keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny generated checkpoints, made once per test session."""
    from rempd.model.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {shape: make_checkpoint(shape, root / shape, seed=0) for shape in ("tiny-llama", "tiny-qwen2")}


class RunningDaemon:
    """A real `rempd serve` subprocess on a temporary socket and port."""

    def __init__(self, model: Path, tmp: Path, tp: int = 1, pp: int = 1, workers: int = 4,
                 extra: list[str] | None = None, env: dict[str, str] | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.socket = str(tmp / "rempd.sock")
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_name = model.name
        self.log = tmp / "rempd.log"
        cmd = [sys.executable, "-m", "rempd", "serve", "--model", str(model), "--cpu-workers", str(workers),
               "--tp", str(tp), "--pp", str(pp), "--port", str(self.port), "--socket", self.socket, *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 120.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rempd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"rempd not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def control(self):
        import httpx

        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://rempd", timeout=120)

    def rempctl(self, *args: str) -> subprocess.CompletedProcess:
        """`rempctl ARGS` against this daemon, run as an operator would; wide, or rich wraps tables at 80 columns."""
        return subprocess.run([sys.executable, "-m", "rempctl", *args, "--socket", self.socket], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "220"}, check=False)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_daemon(tmp_path):
    """start_daemon(model, tp=…, pp=…, extra=[…], env={…}) → RunningDaemon, stopped after the test."""
    started: list[RunningDaemon] = []

    def start(model: Path, **kwargs) -> RunningDaemon:
        folder = tmp_path / f"daemon{len(started)}"
        folder.mkdir()
        daemon = RunningDaemon(model, folder, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def daemon_flags() -> list[str]:
    """More `rempd serve` flags for a module's faulty_daemon (a module overrides this fixture)."""
    return []


@pytest.fixture(scope="module")
def faulty_daemon(checkpoints, tmp_path_factory, daemon_flags):
    """One tiny-llama daemon per test module, with fault injection on (tests slow, break or collide switches)."""
    running = RunningDaemon(checkpoints["tiny-llama"], tmp_path_factory.mktemp("daemon"),
                            env={"REMP_ENABLE_FAULT_INJECTION": "1"},
                            # small rounds, so the switch tests cross many of them
                            extra=["--switch-round-bytes", "64KiB", *daemon_flags])
    yield running
    running.stop()


# GPU tests (test_gpu*.py, marked gpu): a generated llama3-1b checkpoint and its float32 reference tokens (reference
# attention, no graphs), made once per run for every GPU module
@pytest.fixture(scope="session")
def llama1b(tmp_path_factory):
    from rempd.model.make_checkpoint import make_checkpoint

    return make_checkpoint("llama3-1b", tmp_path_factory.mktemp("gpu") / "llama3-1b", seed=0)


@pytest.fixture(scope="session")
def fp32_reference(llama1b):
    from gpu_setup import FP32, GREEDY_LONG, PROMPTS, need_gpus
    from rempd import LLM

    need_gpus(1)
    with LLM(llama1b, devices=[0], attention="reference", cuda_graphs=False, **FP32) as llm:
        assert not any(info["kernels"] for info in llm.engine.shard_infos)
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY_LONG)], llm.engine.score(PROMPTS[3])
