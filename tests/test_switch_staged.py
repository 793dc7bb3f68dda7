"""Staged switches of a real rempd (4 gloo workers): the new topology is prepared while the old one streams, then a
short cut. Outputs must equal those of no switch; a staging limit too small for the target falls back, and says so."""
import asyncio
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from fault_tools import switch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from switch_matrix import cell_order  # noqa: E402

TOPOLOGIES = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]
PROMPTS = [f"Stream {i} says: " + "lorem ipsum dolor sit amet " * (i % 3 + 1) for i in range(8)]
# every stream lives through five switches (a staging step also drains the steps sent ahead); the daemon's context
# is 512 tokens, the longest prompt 64
MAX_TOKENS = 440
SWITCHES_PER_BATCH = 5


def every_ordered_pair() -> list[tuple[int, int]]:
    """Each ordered pair of TOPOLOGIES once, as one chain (the switch matrix's order)."""
    cells = cell_order(TOPOLOGIES)
    return [cells[0][0]] + [target for _, target in cells]


@pytest.fixture(scope="module")
def daemon_flags():
    # CPU staging moves 64 KiB between two steps unless told; with async tokens two steps finish between two
    # pre-copy rounds, and at that size the pre-copy did not catch up with decoding before its round limit
    # (staged switches out of TP4PP1 took 5-6 s, and streams ended before the next cut)
    return ["--staging-chunk-bytes", "256KiB"]


@pytest.fixture(scope="module")
def daemon(faulty_daemon):
    return faulty_daemon


@pytest.fixture(scope="module")
def reference(daemon):
    """Greedy completions with no switch, all in one batch."""
    client = AsyncOpenAI(base_url=f"{daemon.base_url}/v1", api_key="none")

    async def one(prompt: str) -> str:
        answer = await client.completions.create(model=daemon.model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"ignore_eos": True})
        return answer.choices[0].text

    async def every() -> list[str]:
        return list(await asyncio.gather(*map(one, PROMPTS)))
    return asyncio.run(every())


async def stream_through(daemon, targets: list[tuple[int, int]], mode: str = "staged", prompts: list[str] = PROMPTS,
                         max_tokens: int = MAX_TOKENS, **extra):
    """Every prompt streams while the switches run one after another; returns texts, reports and token times."""
    client = AsyncOpenAI(base_url=f"{daemon.base_url}/v1", api_key="none")
    chunks: list[list[str]] = [[] for _ in prompts]
    times: list[float] = []

    async def one(i: int) -> str:
        stream = await client.completions.create(model=daemon.model_name, prompt=prompts[i], max_tokens=max_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for event in stream:
            chunks[i].append(event.choices[0].text)
            times.append(time.time())
        return "".join(chunks[i])

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    while not all(len(c) >= 3 or t.done() for c, t in zip(chunks, tasks)):
        await asyncio.sleep(0.005)
    with daemon.control() as ctl:
        ids = []
        for tp, pp in targets:
            ids.append((await asyncio.to_thread(switch, ctl, tp, pp, mode=mode, **extra))["id"])
        texts = list(await asyncio.gather(*tasks))
        return texts, [ctl.get(f"/v1/switches/{i}").json() for i in ids], times


def test_every_ordered_pair_staged_keeps_streams_token_identical(daemon, reference):
    chain = every_ordered_pair()
    with daemon.control() as ctl:
        assert switch(ctl, *chain[0], mode="stop_the_world")["state"] == "committed"
        preempted = ctl.get("/v1/status").json()["num_preempted"]
    seen = set()
    for start in range(0, len(chain) - 1, SWITCHES_PER_BATCH):
        legs = chain[start:start + SWITCHES_PER_BATCH + 1]
        texts, reports, times = asyncio.run(stream_through(daemon, legs[1:]))
        assert texts == reference, legs
        for (src, dst), r in zip(zip(legs, legs[1:]), reports):
            seen.add((src, dst))
            assert (r["state"], r["mode"], r["mode_reason"]) == ("committed", "staged", None), r
            assert r["requests_live"] == len(PROMPTS) and r["requests_preempted"] == 0, r
            assert r["kv_blocks_precopied"] > 0 and r["kv_blocks_delta"] < r["kv_blocks_migrated"], r
            assert 0 < r["cut_seconds"] < r["total_seconds"] and r["staging_seconds"] > 0, r
            staging = (r["started_at"], r["started_at"] + r["staging_seconds"])
            assert sum(staging[0] <= t <= staging[1] for t in times) > 0, "no token while staging"
    assert len(seen) == 30
    with daemon.control() as ctl:
        assert ctl.get("/v1/status").json()["num_preempted"] == preempted  # no KV was recomputed


def test_rempctl_metrics_and_history_show_the_pause_apart_from_the_total(daemon):
    import json

    staged = json.loads(daemon.rempctl("switch", "--tp", "2", "--pp", "2", "--staged", "--json").stdout)
    assert (staged["state"], staged["mode"]) == ("committed", "staged")
    assert list(staged["phases"]) == ["plan", "groups", "stage", "quiesce", "delta", "commit", "resume"]  # idle
    stopped = daemon.rempctl("switch", "--tp", "4", "--pp", "1")  # rempd's default: stop-the-world
    assert stopped.returncode == 0 and "mode stop-the-world" in stopped.stdout and "serving pause" in stopped.stdout
    shown = daemon.rempctl("switch", "--tp", "1", "--pp", "2", "--staged")
    assert shown.returncode == 0 and "mode staged" in shown.stdout and "(cut " in shown.stdout, shown.stdout
    table = daemon.rempctl("switches")
    for expected in ("mode", "pause", "cut", "staged", "stop"):
        assert expected in table.stdout, expected
    metrics = httpx.get(f"{daemon.base_url}/metrics").text
    counts = {mode: float(line.split()[-1]) for line in metrics.splitlines()
              for mode in ("staged", "stop_the_world")
              if line.startswith("remp:topology_switch_pause_seconds_count") and f'mode="{mode}"' in line}
    assert counts["staged"] >= 2 and counts["stop_the_world"] >= 1, counts


def test_staging_memory_refused_falls_back_to_stop_the_world(checkpoints, start_daemon):
    small = start_daemon(checkpoints["tiny-llama"], workers=2, extra=["--staging-memory", "64KiB"])
    client = OpenAI(base_url=f"{small.base_url}/v1", api_key="none")
    expected = [client.completions.create(model=small.model_name, prompt=p, max_tokens=48, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS[:2]]
    texts, reports, _ = asyncio.run(stream_through(small, [(2, 1)], prompts=PROMPTS[:2], max_tokens=48))
    report = reports[0]
    assert (report["state"], report["mode"]) == ("committed", "stop_the_world"), report
    assert "staging needs" in report["mode_reason"] and "the staging limit allows 64.0 KiB" in report["mode_reason"]
    assert list(report["phases"]) == ["plan", "quiesce", "groups", "transform", "commit", "resume"]
    assert report["cut_seconds"] == pytest.approx(report["total_seconds"], rel=0.5)
    assert texts == expected


def test_a_target_that_does_not_fit_beside_the_pool_stages_after_free_blocks_are_given_back(checkpoints,
                                                                                             start_daemon):
    from rempd.worker_pool.device_memory import CPU_DEVICE_BYTES_ENV

    # each CPU worker counts as a device of its 64 MiB pool and 700 kB more: tiny-llama's 428 kB TP1PP2 shard
    # leaves no room to stage its TP2PP1 one (test_staging_give_back.py has the figures)
    small = start_daemon(checkpoints["tiny-llama"], tp=1, pp=2, workers=2,
                         env={CPU_DEVICE_BYTES_ENV: str((64 << 20) + 700_000)})
    shown = small.rempctl("switch", "--tp", "2", "--pp", "1", "--staged")
    assert shown.returncode == 0 and "mode staged" in shown.stdout, shown.stdout
    assert "free KV blocks given back to stage the target" in shown.stdout, shown.stdout
    assert "giving blocks back" in shown.stdout, shown.stdout  # no request was live: its pause was all
    # and back while requests stream: the pool kept at the cut is the smaller one, but the live KV pre-copied
    # beside it needs more room again
    client = OpenAI(base_url=f"{small.base_url}/v1", api_key="none")
    expected = [client.completions.create(model=small.model_name, prompt=p, max_tokens=48, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS[:2]]
    texts, reports, _ = asyncio.run(stream_through(small, [(1, 2)], prompts=PROMPTS[:2], max_tokens=48))
    report = reports[0]
    assert (report["state"], report["mode"], report["mode_reason"]) == ("committed", "staged", None), report
    assert report["kv_blocks_given_back"] > 0 and report["phases"]["give_back"] > 0, report
    # the serving pause counts the give-back's pause as well as the cut's
    assert report["serving_pause_s"] > report["give_back_pause_s"] >= report["phases"]["give_back"], report
    assert report["requests_preempted"] == 0 and texts == expected


@pytest.mark.parametrize("phase, kind", [("groups", "kill"), ("transform", "raise")])  # staging, then the cut
def test_a_fault_while_staging_or_in_the_cut_rolls_back_and_serving_goes_on(daemon, reference, phase, kind):
    with daemon.control() as ctl:
        switch(ctl, 2, 2, mode="stop_the_world")
    texts, reports, _ = asyncio.run(stream_through(daemon, [(4, 1)], fault={"phase": phase, "kind": kind}))
    assert (reports[0]["state"], reports[0]["mode"]) == ("rolled_back", "staged"), reports[0]
    with daemon.control() as ctl:
        status = ctl.get("/v1/status").json()
    assert status["topology"] == {"tp": 2, "pp": 2}
    assert all(w["state"] in ("active", "standby") for w in status["workers"])
    assert texts == reference  # no request failed; recomputed ones give the same tokens
