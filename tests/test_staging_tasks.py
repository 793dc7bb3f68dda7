"""What each gap of a staged switch posts: heavy tasks alone, weight chunks merged up to chunks_per_gap, the build
only once the host loads are in, one graph capture a gap."""
from rempd.migrate.staging_tasks import StagingTasks


def test_gaps_merge_chunks_wait_for_loads_and_capture_one_size_each():
    tasks = StagingTasks([["a"], ["b"], ["c"]], graphs=True)
    gaps = []
    loaded = False
    while tasks:
        work = tasks.next_gap(loaded, chunks_per_gap=2, graph_sizes=[3, 8])
        gaps.append((work.kind, work.args))
        loaded = work.kind == "poll"  # the loads are in once polled
    assert gaps == [("groups", ()), ("weights", (["a", "b"], [])), ("weights", (["c"], [])), ("poll", ()),
                    ("build", ()), ("graphs", ([3],)), ("graphs", ([8],))]
    no_graphs = StagingTasks([], graphs=True)
    assert [no_graphs.next_gap(True, 4, []) for _ in range(3)][2] is None and not no_graphs


def test_graphs_staged_for_the_live_batch_and_for_it_with_the_waiting_requests_one_per_bucket():
    from types import SimpleNamespace

    from rempd.engine.graph_warmup import expected_batch_sizes

    def engine(running: int, waiting: int, max_num_seqs: int = 16):
        return SimpleNamespace(scheduler=SimpleNamespace(running=[0] * running, waiting=[0] * waiting),
                               config=SimpleNamespace(max_num_seqs=max_num_seqs))

    assert expected_batch_sizes(engine(8, 0), 1) == [8]
    assert expected_batch_sizes(engine(8, 4), 1) == [12, 8]  # buckets 16 and 8, largest first
    assert expected_batch_sizes(engine(8, 4), 4) == [3, 2]  # micro-batches of 3, now of 2 (buckets 4 and 2)
    assert expected_batch_sizes(engine(5, 1), 1) == [5]  # 5 and 6 share bucket 8: one capture
    assert expected_batch_sizes(engine(12, 40, max_num_seqs=32), 1) == [32, 12]  # capped at max_num_seqs
    assert expected_batch_sizes(engine(0, 0), 2) == []
