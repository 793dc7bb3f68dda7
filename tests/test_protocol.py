"""rempd.protocol: the control API's wire types round-trip through JSON and reject what does not fit."""
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rempd.protocol import (API_VERSION, ErrorInfo, ErrorResponse, ProtocolError, StatusResponse, TopologyInfo,
                            WorkerStatus)

small = st.integers(min_value=0, max_value=2 ** 40)
maybe_small = st.none() | small
worker_states = st.sampled_from(["active", "standby", "dead", "restarting"])
workers = st.builds(WorkerStatus, index=small, device=st.sampled_from(["cpu", "cuda:0", "cuda:3"]), pid=maybe_small,
                    state=worker_states, pp_rank=maybe_small, tp_rank=maybe_small, weight_bytes=small,
                    kv_blocks=small, memory_used_bytes=maybe_small, memory_total_bytes=maybe_small,
                    utilization_pct=st.none() | st.floats(0, 100))
statuses = st.builds(
    StatusResponse, api_version=st.just(API_VERSION), version=st.text(max_size=10),
    state=st.sampled_from(["starting", "serving", "recovering", "draining", "failed"]), pid=small,
    uptime_s=st.floats(0, 1e7), model=st.none() | st.text(max_size=20), max_model_len=maybe_small,
    progress=st.none() | st.text(max_size=20),
    topology=st.none() | st.builds(TopologyInfo, tp=st.integers(1, 8), pp=st.integers(1, 8)),
    placement=st.lists(small, max_size=8), workers=st.lists(workers, max_size=4), requests_running=small,
    requests_waiting=small, kv_blocks_used=small, kv_blocks_total=small, kv_usage=st.floats(0, 1),
    num_preempted=small, num_recoveries=small)


@settings(max_examples=60, deadline=None)
@given(statuses)
def test_status_round_trips_through_json(status):
    assert StatusResponse.from_dict(json.loads(json.dumps(status.to_dict()))) == status


def test_unknown_fields_are_ignored_so_older_clients_read_newer_daemons():
    data = StatusResponse(API_VERSION, "1", "serving", 1, 2.0).to_dict()
    data["added_later"] = {"x": 1}
    assert StatusResponse.from_dict(data).state == "serving"


def test_other_api_version_is_refused_with_both_versions_named():
    data = StatusResponse(API_VERSION, "1", "serving", 1, 2.0).to_dict()
    data["api_version"] = API_VERSION + 1
    with pytest.raises(ProtocolError, match=f"version {API_VERSION + 1}.*version {API_VERSION}"):
        StatusResponse.from_dict(data)


@pytest.mark.parametrize("field, value", [
    ("pid", "12"), ("pid", True), ("uptime_s", "1.0"), ("state", "sleeping"), ("topology", {"tp": 1}),
    ("workers", {}), ("placement", [1, "2"]),
])
def test_mistyped_fields_are_refused_with_their_path(field, value):
    data = StatusResponse(API_VERSION, "1", "serving", 1, 2.0).to_dict()
    data[field] = value
    with pytest.raises(ProtocolError, match=field):
        StatusResponse.from_dict(data)


def test_missing_required_field_is_named():
    data = StatusResponse(API_VERSION, "1", "serving", 1, 2.0).to_dict()
    del data["pid"]
    with pytest.raises(ProtocolError, match="missing field 'pid'"):
        StatusResponse.from_dict(data)


def test_ints_are_accepted_where_floats_are_expected():
    data = StatusResponse(API_VERSION, "1", "serving", 1, 2.0).to_dict()
    data["uptime_s"] = 3
    assert StatusResponse.from_dict(data).uptime_s == 3.0


def test_error_response_has_openais_shape():
    body = ErrorResponse(ErrorInfo("no such model", "not_found_error", "model", "model_not_found")).to_dict()
    assert body == {"error": {"message": "no such model", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}
    assert ErrorResponse.from_dict(body).error.code == "model_not_found"
    assert ErrorResponse.from_dict({"error": {"message": "m", "type": "t", "code": 503}}).error.code == 503


def test_protocol_imports_only_the_standard_library():
    code = ("import rempd.protocol, sys; heavy = {'torch', 'pydantic', 'fastapi', 'httpx', 'numpy'} & set(sys.modules);"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
