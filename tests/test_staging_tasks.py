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
