"""The step log and the workers' profile that bench/decode_profile.py reads: medians of recent steps, and the driver's
and a worker's stamps of one step on one clock; the bench's phases of TP and PP steps."""
import sys
from pathlib import Path
from types import SimpleNamespace

from rempd import LLM, SamplingParams
from rempd.engine.step_log import StepLog
from rempd.worker_pool.step_profile import kernel_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from decode_profile import all_reduce_s, run_batch  # noqa: E402
from step_phases import micro_batches, phase_medians  # noqa: E402


def test_medians_leave_out_a_slow_first_step():
    log = StepLog(("begin", "sent", "done"), window=4)
    log.add(0.0, 5.0, 6.0)  # a first step that compiled kernels
    for t in (10.0, 20.0, 30.0):
        log.add(t, t + 0.001, t + 0.003)
    assert abs(log.median_ms(("begin", "sent")) - 1.0) < 1e-6
    assert abs(log.median_ms(("begin", "sent"), ("sent", "done")) - 3.0) < 1e-6
    log.add(40.0, 40.002, 40.004)
    assert len(log.rows) == 4 and log.rows[0][0] == 10.0  # a window of the recent steps
    assert log.to_dicts()[-1] == {"begin": 40.0, "sent": 40.002, "done": 40.004}


def test_kernel_table_is_per_step_and_largest_first():
    events = [SimpleNamespace(name=name, device_time_total=us) for name, us in
              [("gemv", 300.0), ("norm", 20.0), ("gemv", 300.0), ("norm", 20.0), ("copy", 10.0)]]
    table = kernel_table(events, steps=2)
    assert table["busy_ms_per_step"] == 0.325 and table["kernels_per_step"] == 2.5
    assert [r["name"] for r in table["top"]] == ["gemv", "norm", "copy"]
    assert table["top"][0]["ms_per_step"] == 0.3 and table["top"][0]["calls_per_step"] == 1.0


def test_driver_and_worker_stamps_of_each_step_share_one_clock(checkpoints):
    with LLM(checkpoints["tiny-llama"], cpu_workers=1, max_num_seqs=4) as llm:
        engine = llm.engine
        engine.pool.call("profile", "start", 0, 0)
        engine.step_log.clear()
        llm.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        worker = engine.pool.call("profile", "stop")[0]
        driver = engine.step_log.to_dicts()
        assert worker["kernels"] is None  # no trace asked (and none on CPU)
        assert len(driver) == len(worker["steps"]) == 5  # one prefill, four decodes
        for e, w in zip(driver, worker["steps"]):
            # the worker may wake on the step before the driver stamps "sent": only causal order is certain
            worker_side = [w["received"], w["unpacked"], w["launched"], w["done"]]
            assert e["begin"] <= worker_side[0] and worker_side == sorted(worker_side) and worker_side[-1] <= e["replied"]
            assert e["begin"] <= e["sent"] <= e["replied"] <= e["done"], (e, w)
            assert e["seqs"] == w["seqs"] == 2
        assert [w["tokens"] for w in worker["steps"]] == [7, 2, 2, 2, 2]
        assert engine.status()["driver_host_ms_per_step"] > 0
        assert engine.pool.call("info")[0]["host_ms_per_step"] > 0


def test_every_tp_rank_logs_each_step_and_the_bench_reads_the_output_workers(checkpoints):
    with LLM(checkpoints["tiny-llama"], tp=2, cpu_workers=2, max_num_seqs=4) as llm:
        engine = llm.engine
        driver, workers = run_batch(llm, 4, 16, 12, engine.model_config.vocab_size, (0, 0))
        output = engine.active.index(engine.placement.output_worker)
        assert len(workers) == 2 and [len(w["steps"]) for w in workers] == [len(driver)] * 2
        for e, *ranks in zip(driver, *(w["steps"] for w in workers)):
            # the driver's reply waits for every rank, so each rank's stamps fall inside the driver's
            assert all(e["begin"] <= w["received"] <= w["done"] <= e["replied"] for w in ranks), (e, ranks)
        phases = phase_medians(driver, [w["steps"] for w in workers], output, 4, 1, skip=2)
        # 11 decode steps of 4 sequences follow the prefill: 10 pairs of them, the first 2 skipped
        assert phases["micro_batches"] == [4] and phases["steps"] == 8
        assert phases["token_period"] == phases["wall"] > 0  # one micro-batch: a token every step
        assert phases["gpu_span_by_worker"] == [None, None]  # no CUDA events on CPU
        assert all_reduce_s(llm, 4) > 0  # the floor's all-reduce, timed on the TP group


def test_under_pp_a_token_period_spans_every_micro_batch():
    assert micro_batches(64, 2) == [32, 32] and micro_batches(5, 2) == [3, 2] and micro_batches(1, 2) == [1]
    # two micro-batches of 2 alternate, one step every 10 ms; a prefill step first
    worker = [{"received": t, "unpacked": t, "launched": t, "done": t + 0.009, "seqs": 2, "tokens": n,
               "graph": True, "gpu_ms": float("nan")} for t, n in [(0.0, 32)] + [(0.01 * k, 2) for k in range(1, 13)]]
    driver = [{"begin": w["received"] - 0.001, "sent": w["received"], "replied": w["done"] + 0.0005,
               "done": w["done"] + 0.001, "seqs": 2} for w in worker]
    phases = phase_medians(driver, [worker, worker], 1, 4, 2, skip=1)
    assert phases["steps"] == 12 - 2 - 1  # steps 1..10 have two whole decode steps after them
    assert abs(phases["wall"] - 10.0) < 1e-6 and abs(phases["token_period"] - 20.0) < 1e-6
    assert phases["gpu_span"] is None and phases["micro_batches"] == [2, 2]
