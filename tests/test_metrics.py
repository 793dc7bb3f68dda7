"""/metrics: the `remp:` families, the two renderers (prometheus_client and our own text) agreeing, histograms."""
import pytest

from rempd.api.metrics import Histogram, Metrics, render_prometheus_client, render_text
from test_serving_api import MODEL, StandInEngine, call, make_app


def test_metrics_expose_remp_names_and_both_renderers_agree():
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = Metrics(MODEL)
    metrics.ttft.observe(0.03)
    metrics.record_switch(0.8)
    families = list(metrics.families(StandInEngine()))
    text = render_text(families)
    assert {"remp:time_to_first_token_seconds", "remp:inter_token_latency_seconds", "remp:num_requests_running",
            "remp:num_requests_waiting", "remp:kv_cache_usage_perc", "remp:topology_info", "remp:topology_switch",
            "remp:topology_switch_duration_seconds", "remp:decode_graphs_pending", "remp:decode_graphs_backfilled"
            } <= {f.name for f in parser.text_string_to_metric_families(text)}
    assert 'remp:topology_info{model_name="tiny",tp="2",pp="1"} 1.0' in text
    assert 'remp:kv_cache_usage_perc{model_name="tiny"} 0.25' in text

    def samples(exposition):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                      for f in parser.text_string_to_metric_families(exposition) for s in f.samples)
    assert samples(text) == samples(render_prometheus_client(families).decode())
    response = call(make_app(), "GET", "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)] and h.count == 4
