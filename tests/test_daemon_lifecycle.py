"""rempd's lifecycle on its failure paths, with stand-in engines: a start-up that fails, a taken port, an
engine that cannot recover, and a drain that times out. Each must leave no socket behind and exit as systemd
needs (0 after a drain, non-zero on failure). The happy path runs against the real engine end to end.
"""
import asyncio
import os
import signal
import socket

import httpx
import pytest

from rempd import daemon as daemon_module
from rempd.config import DaemonConfig
from rempd.daemon import Daemon
from rempd.engine.outputs import EngineStats, RequestOutput


@pytest.fixture
def config(tmp_path):
    return DaemonConfig.from_sources(None, {"model": str(tmp_path / "tiny"), "cpu_workers": 1, "port": 0,
                                            "socket": str(tmp_path / "run" / "rempd.sock"), "drain_timeout": 0.2})


@pytest.fixture
def notes(tmp_path, monkeypatch):
    """What the daemon tells systemd, in order."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def read():
        out = []
        while True:
            try:
                out.append(sock.recv(4096).decode())
            except BlockingIOError:
                return out
    yield read
    sock.close()


class StandInEngine:
    """Hangs every request after one token; `is_failed` can be flipped to say it gave up."""
    model_name = "tiny"
    max_model_len = 64
    is_healthy = True

    class tokenizer:
        vocab_size = 100

        @staticmethod
        def encode(text, add_special_tokens=True):
            return [1, 2, 3]

    def __init__(self):
        self.is_failed = False
        self.shut_down = False
        self.running = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, params):
        yield RequestOutput(request_id, [5], "a", False, None, len(prompt_token_ids), 1)
        self.running.set()
        await asyncio.Event().wait()

    def stats(self):
        return EngineStats(0, 0, 0, 10, 0)

    def status(self):
        return {"topology": {"tp": 1, "pp": 1}, "placement": [0], "workers": []}

    async def shutdown(self):
        self.shut_down = True


def factory(engine):
    async def create(engine_config, on_progress):
        on_progress("loading weights", 0.5)
        return engine
    return create


def test_a_failed_start_exits_1_and_removes_the_socket(config, notes):
    async def broken(engine_config, on_progress):
        raise ValueError("/models/tiny: no config.json")
    assert asyncio.run(Daemon(config, broken).run()) == 1
    assert not os.path.exists(config.socket)
    assert not any("READY=1" in n for n in notes())


def test_a_taken_port_exits_1_before_loading_anything(config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config.port = taken.getsockname()[1]
        loaded = []

        async def create(engine_config, on_progress):
            loaded.append(1)
        assert asyncio.run(Daemon(config, create).run()) == 1
    assert not loaded and not os.path.exists(config.socket)


def test_an_engine_that_cannot_recover_makes_the_daemon_exit_1(config, notes, monkeypatch):
    monkeypatch.setattr(daemon_module, "MONITOR_INTERVAL_S", 0.02)
    engine = StandInEngine()

    async def main():
        d = Daemon(config, factory(engine))
        run = asyncio.create_task(d.run())
        while d.life.state != "serving":
            await asyncio.sleep(0.01)
        engine.is_failed = True
        return await asyncio.wait_for(run, 10)
    assert asyncio.run(main()) == 1
    assert engine.shut_down and not os.path.exists(config.socket)
    sent = notes()
    assert any(n.startswith("READY=1") for n in sent) and any(n.startswith("STOPPING=1") for n in sent)


def test_sigterm_drains_then_aborts_what_outlives_the_drain_timeout(config, notes):
    engine = StandInEngine()

    async def main():
        d = Daemon(config, factory(engine))
        run = asyncio.create_task(d.run())
        while d.serving is None or not d.serving.started:
            await asyncio.sleep(0.01)
        port = d.serving.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "stream": True}))
            await asyncio.wait_for(engine.running.wait(), 10)
            os.kill(os.getpid(), signal.SIGTERM)
            while d.life.state != "draining":
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/completions", json={"prompt": "x"})
            return await asyncio.wait_for(run, 10), await request, refused
    code, response, refused = asyncio.run(main())
    assert code == 0
    assert refused.status_code == 503
    assert '"code":"service_unavailable"' in response.text.splitlines()[-2] and "[DONE]" not in response.text
    assert engine.shut_down and not os.path.exists(config.socket)
    sent = notes()
    assert [n.split("\n")[0] for n in sent if n.startswith(("READY", "STOPPING"))] == ["READY=1", "STOPPING=1"]
    assert any("loading weights" in n for n in sent)
