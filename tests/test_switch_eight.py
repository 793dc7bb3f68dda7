"""Live switches among 8-device topologies of a real rempd on 8 gloo workers, clients streaming through the official
openai client. tiny-llama8 splits every way over 8 devices; at TP8 each of its 4 KV heads is held by two ranks.
Stop-the-world switches, and a staged one back to TP1PP8."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import RunningDaemon

import fault_tools
from rempd.model.make_checkpoint import make_checkpoint

PROMPTS = [f"Stream {i} says: " + "lorem ipsum dolor sit amet " * (i + 1) for i in range(4)]
MAX_TOKENS = 128  # back to back, streams moved 6-14 chunks per switch on 2 cores: 128 keeps all 4 live to the end
# from TP1PP8: every 8-device shape, then 4 workers standing by at TP2PP2, then all 8 again, staged
TARGETS = [(8, 1, "stop_the_world"), (2, 4, "stop_the_world"), (4, 2, "stop_the_world"), (2, 2, "stop_the_world"),
           (1, 8, "staged")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    model = make_checkpoint("tiny-llama8", tmp_path_factory.mktemp("checkpoint") / "tiny-llama8", seed=0)
    running = RunningDaemon(model, tmp_path_factory.mktemp("daemon"), tp=1, pp=8, workers=8)
    yield running
    running.stop()


def test_streams_stay_token_identical_through_every_8_device_shape(daemon):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched as the streams will be: quicker than one by one
        reference = list(pool.map(lambda p: fault_tools.greedy(daemon, p, MAX_TOKENS), PROMPTS))
    before = fault_tools.status(daemon)["num_preempted"]
    # each topology decodes a few tokens of every stream from the KV it received before the next switch
    texts, reports = asyncio.run(fault_tools.stream_through_switches(
        daemon, [{"tp": tp, "pp": pp, "mode": mode} for tp, pp, mode in TARGETS], PROMPTS, MAX_TOKENS,
        chunks_between=3))
    assert texts == reference
    for (tp, pp, mode), report in zip(TARGETS, reports):
        assert report["state"] == "committed" and report["mode"] == mode, report
        assert report["target"] == f"TP{tp}PP{pp}" and len(report["placement"]) == tp * pp
        assert report["requests_live"] == len(PROMPTS) and report["kv_blocks_migrated"] > 0, report
        assert report["requests_preempted"] == 0
    now = fault_tools.status(daemon)
    assert now["num_preempted"] == before  # no KV was recomputed
    assert now["topology"] == {"tp": 1, "pp": 8}
    assert sorted(w["state"] for w in now["workers"]) == ["active"] * 8


@pytest.mark.parametrize("tp, pp, reason", [(3, 1, "does not divide the 8 attention heads"),
                                            (4, 4, "more than the 8 devices"),
                                            (16, 1, "more than the 8 devices")])
def test_plan_refuses_an_invalid_target_with_its_reason(daemon, tp, pp, reason):
    with daemon.control() as ctl:
        response = ctl.post("/v1/plan", json={"tp": tp, "pp": pp})
        assert response.status_code == 400 and reason in response.json()["error"]["message"]
    result = daemon.rempctl("plan", "--tp", str(tp), "--pp", str(pp))
    assert result.returncode == 1 and reason in result.stderr
    assert fault_tools.status(daemon)["topology"] == {"tp": 1, "pp": 8}
