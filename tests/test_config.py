"""rempd.config and the `rempd serve` flags: defaults, then the TOML file, then flags; clear errors."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rempd import __main__ as cli
from rempd.config import ConfigError, DaemonConfig, find_config_file
from rempd.config_values import parse_devices, parse_size

BASE = {"model": "/models/tiny", "cpu_workers": 2}
NOWHERE = Path("/nonexistent/rempd.toml")  # so that a real /etc/remp/rempd.toml never leaks into a test


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, size", [
    (4096, 4096), ("4096", 4096), ("64MiB", 64 << 20), ("64M", 64 << 20), ("2G", 2 << 30), ("2 GiB", 2 << 30),
    ("1.5GB", 1_500_000_000), ("10kB", 10_000), ("1T", 1 << 40),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12Q", "-1", "MiB", True, 1.5])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_devices():
    assert parse_devices("0,1, 2,3") == [0, 1, 2, 3]
    assert parse_devices([2, 3]) == [2, 3]
    assert parse_devices("") == []
    for bad in ("0,0", "a", "-1", [1.0], "1;2"):
        with pytest.raises(ValueError):
            parse_devices(bad)


def test_defaults_and_engine_config():
    config = DaemonConfig.from_sources(None, BASE)
    assert (config.host, config.port, config.socket) == ("127.0.0.1", 8000, "/run/remp/rempd.sock")
    assert config.model_name == "tiny"
    engine = config.engine_config()
    assert (engine.model_dir, engine.cpu_workers, engine.devices, engine.kv_cache_memory) == \
        ("/models/tiny", 2, [], 64 << 20)
    assert engine.async_tokens


def test_flags_override_the_file_and_both_spellings_work(tmp_path):
    path = write(tmp_path / "rempd.toml", """
        model = "/models/tiny"
        devices = [0, 1, 2, 3]
        tp = 2
        kv-cache-memory = "1GiB"
        max_num_seqs = 8
        port = 9000
        socket-group = 1234
    """)
    config = DaemonConfig.from_sources(path, {"port": 9100, "tp": None, "devices": "0,1"})
    assert config.port == 9100  # flag wins
    assert config.tp == 2  # not given on the command line: the file's value stands
    assert config.devices == [0, 1]
    assert config.kv_cache_memory == 1 << 30 and config.max_num_seqs == 8 and config.socket_group == "1234"


def test_relative_model_path_in_a_file_means_next_to_the_file(tmp_path):
    path = write(tmp_path / "rempd.toml", 'model = "models/tiny"\ncpu-workers = 1\n')
    assert DaemonConfig.from_sources(path).model == str(tmp_path / "models" / "tiny")


@pytest.mark.parametrize("text, message", [
    ('modle = "/m"', r"unknown key 'modle'"),
    ('port = "eighty"', r"port: 'eighty' is not an integer"),
    ('tp = 1.5', r"tp: expected int"),
    ('model = "/m"\nport = [', r"not valid TOML"),
])
def test_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "rempd.toml", text)
    with pytest.raises(ConfigError, match=message) as info:
        DaemonConfig.from_sources(path, {})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("flags, message", [
    ({"cpu_workers": 1}, "no model"),
    ({"model": "/m"}, "no devices"),
    ({**BASE, "devices": "0"}, "not both"),
    ({**BASE, "tp": 2, "pp": 2}, r"tp·pp = 4 needs more than the 2 devices"),
    ({**BASE, "tp": 0}, "tp must be at least 1"),
    ({**BASE, "dtype": "int8"}, "dtype 'int8'"),
    ({**BASE, "port": 70000}, "port 70000"),
    ({**BASE, "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({**BASE, "socket": "rel.sock"}, "absolute path"),
    ({**BASE, "drain_timeout": -1}, "drain_timeout"),
])
def test_invalid_configurations(flags, message):
    with pytest.raises(ConfigError, match=message):
        DaemonConfig.from_sources(None, flags)


def test_config_file_lookup(tmp_path):
    default = tmp_path / "rempd.toml"
    assert find_config_file(None, default) is None
    write(default, "")
    assert find_config_file(None, default) == default
    with pytest.raises(ConfigError, match="no such config file"):
        find_config_file(tmp_path / "missing.toml", default)


def test_api_key_stays_out_of_the_repr():
    assert "sekrit" not in repr(DaemonConfig.from_sources(None, {**BASE, "api_key": "sekrit"}))


@pytest.fixture
def started(monkeypatch):
    """`rempd serve` up to the point where the daemon would start; the config it would start with."""
    from rempd import console, daemon

    seen = []
    monkeypatch.setattr(console, "configure_logging", lambda: None)
    monkeypatch.setattr(daemon, "run", lambda config: seen.append(config) or 0)
    monkeypatch.setattr(cli, "find_config_file", lambda explicit: find_config_file(explicit, default=NOWHERE))
    return seen


def test_cli_flags_file_and_environment(started, tmp_path, monkeypatch):
    path = write(tmp_path / "r.toml", 'model = "/models/tiny"\ncpu-workers = 4\nport = 9000\n')
    monkeypatch.setenv("REMP_SOCKET", "/tmp/x/rempd.sock")
    result = CliRunner().invoke(cli.app, ["serve", "--config", str(path), "--tp", "2", "--pp", "2",
                                          "--kv-cache-memory", "32MiB", "--api-key", "k", "--no-async-tokens"])
    assert result.exit_code == 0, result.output
    (config,) = started
    assert (config.tp, config.pp, config.port, config.socket) == (2, 2, 9000, "/tmp/x/rempd.sock")
    assert config.kv_cache_memory == 32 << 20 and config.api_key == "k"
    assert not config.engine_config().async_tokens


def test_cli_bad_configuration_exits_2_with_the_reason(started):
    result = CliRunner().invoke(cli.app, ["serve", "--model", "/m", "--cpu-workers", "1", "--tp", "2"])
    assert result.exit_code == 2
    assert "tp·pp = 2 needs more than the 1 devices" in result.output
    assert not started


def test_cli_make_checkpoint(tmp_path):
    result = CliRunner().invoke(cli.app, ["make-checkpoint", "--shape", "tiny-llama", "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "config.json").is_file()


def test_the_gil_switch_interval_is_pythons_unless_the_environment_names_one(monkeypatch):
    import sys

    from rempd.gil import CANDIDATE_INTERVAL_S, SWITCH_INTERVAL_ENV, set_switch_interval

    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv(SWITCH_INTERVAL_ENV, raising=False)
        assert set_switch_interval() == before
        monkeypatch.setenv(SWITCH_INTERVAL_ENV, str(CANDIDATE_INTERVAL_S))  # the A/B's candidate
        assert set_switch_interval() == pytest.approx(CANDIDATE_INTERVAL_S) == pytest.approx(sys.getswitchinterval())
    finally:
        sys.setswitchinterval(before)
