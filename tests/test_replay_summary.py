"""The workload replayer's per-phase figures (bench/replay.py), on hand-made records: a phase's throughput is the
tokens streamed in it, so a topology that queues shows it in the phase it queues in, not in the phase its
requests were sent."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from replay import Record, delivered_tokens, schedule, summarize  # noqa: E402


def test_throughput_counts_tokens_when_they_are_streamed():
    phases = schedule("low:1,peak:1", peak_rate=1.0, duration=20.0)  # two phases of 10 s
    on_time = Record(0, sent=1.0, prompt_tokens=8, output_tokens=10, ttft=0.5, itl=0.1, e2e=1.5)
    queued = Record(0, sent=2.0, prompt_tokens=8, output_tokens=40, ttft=9.0, itl=0.1, e2e=13.0)  # 11 s → 15 s
    assert delivered_tokens([on_time, queued], 0.0, 10.0) == 10
    assert delivered_tokens([on_time, queued], 10.0, 20.0) == 40
    summary = summarize([on_time, queued], phases, slo_ttft=1.0, slo_itl=0.2)
    low, peak = summary["phases"]["low"], summary["phases"]["peak"]
    assert (low["output_tokens_per_s"], low["offered_tokens_per_s"]) == (1.0, 5.0)
    assert (peak["output_tokens_per_s"], peak["offered_tokens_per_s"]) == (4.0, 0.0)
    assert low["slo_attainment"] == 0.5 and peak["requests"] == 0
