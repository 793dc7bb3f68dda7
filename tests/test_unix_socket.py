"""The control socket: file mode and group, stale-socket handling, and peer-credential refusal of other uids.

Callers of another uid run in a forked child that drops to uid 65534 (we run as root here).
"""
import asyncio
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import traceback

import pytest
import uvicorn
from typer.testing import CliRunner

from rempctl import main as rempctl_main
from rempctl.client import ControlClient, DaemonUnreachable
from rempd.api.control import Lifecycle, create_control_app
from rempd.api.unix_socket import PeerPolicy, SocketError, bind_control_socket, peer_checked_protocol

GROUP = 4242  # needs no entry in /etc/group: chown and the peer check work on the number
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@pytest.fixture
def public_dir():
    # pytest's tmp_path sits under 0700 directories that uid 65534 could not even traverse
    path = tempfile.mkdtemp(prefix="remp-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(public_dir):
    """A control API on its socket, served from a thread, as rempd serves it."""
    path = os.path.join(public_dir, "run", "rempd.sock")
    bound = bind_control_socket(path, str(GROUP))
    life = Lifecycle(model_name="tiny", progress="loading weights (40%)")
    config = uvicorn.Config(create_control_app(life), http=peer_checked_protocol(PeerPolicy.for_group(str(GROUP))),
                            lifespan="off", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[bound.sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield path
    server.should_exit = True
    thread.join(10)
    bound.remove()


def as_user(uid: int, groups: list[int], fn) -> tuple[int, str]:
    """Run fn() in a forked child under uid/groups; its return value is the exit code, its text comes back."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 70
        try:
            os.close(read)
            os.setgroups(groups)
            os.setgid(groups[0] if groups else uid)
            os.setuid(uid)
            code, text = fn()
            os.write(write, text.encode())
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def rempctl_status(path):
    def call():
        try:
            with ControlClient(path, timeout_s=5) as client:
                return 0, client.status().state
        except DaemonUnreachable as exc:
            return 2, str(exc)
    return call


def raw_get(path):
    def call():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: rempd\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return 0, data.decode()
    return call


@root_only
def test_socket_is_0660_in_a_0750_directory_of_the_group(daemon):
    st, dir_st = os.stat(daemon), os.stat(os.path.dirname(daemon))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GROUP
    assert stat.S_IMODE(dir_st.st_mode) == 0o750 and dir_st.st_gid == GROUP


def test_root_reads_status(daemon):
    with ControlClient(daemon) as client:
        status = client.status()
    assert (status.state, status.model, status.progress) == ("starting", "tiny", "loading weights (40%)")
    result = CliRunner().invoke(rempctl_main.app, ["status", "--socket", daemon])
    assert result.exit_code == 0, result.output
    assert "starting" in result.output and "loading weights" in result.output
    result = CliRunner().invoke(rempctl_main.app, ["status", "--json"], env={"REMP_SOCKET": daemon})
    assert result.exit_code == 0 and '"state": "starting"' in result.output


@root_only
def test_other_uid_is_stopped_by_the_file_mode(daemon):
    code, text = as_user(NOBODY, [], rempctl_status(daemon))
    assert code == 2, text
    assert "permission denied" in text


@root_only
def test_other_uid_is_refused_by_peer_credentials_even_on_an_open_socket(daemon):
    os.chmod(os.path.dirname(daemon), 0o755)  # take the file-mode fence away: the peer check must hold alone
    os.chmod(daemon, 0o666)
    code, text = as_user(NOBODY, [], raw_get(daemon))
    assert code == 0, text
    assert text.startswith("HTTP/1.1 403")
    assert '"code":"peer_not_allowed"' in text and f"uid {NOBODY} may not use" in text
    code, text = as_user(NOBODY, [], rempctl_status(daemon))
    assert code == 2 and "refused" in text, text


@root_only
def test_member_of_the_group_is_admitted(daemon):
    code, text = as_user(NOBODY, [GROUP], rempctl_status(daemon))
    assert (code, text) == (0, "starting")


def test_stale_socket_is_replaced_and_a_live_one_is_not_stolen(public_dir):
    path = os.path.join(public_dir, "rempd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a killed daemon leaves behind
    stale.close()
    bound = bind_control_socket(path)
    try:
        with pytest.raises(SocketError, match="already listening"):
            bind_control_socket(path)
    finally:
        bound.remove()
    assert not os.path.exists(path)


def test_a_file_in_the_way_is_not_removed(public_dir):
    path = os.path.join(public_dir, "rempd.sock")
    open(path, "w").close()
    with pytest.raises(SocketError, match="not a socket"):
        bind_control_socket(path)
    assert os.path.isfile(path)


def test_remove_leaves_a_successors_socket(public_dir):
    path = os.path.join(public_dir, "rempd.sock")
    first = bind_control_socket(path)
    first.sock.close()
    os.unlink(path)
    second = bind_control_socket(path)
    first.remove()
    assert os.path.exists(path)
    second.remove()
    assert not os.path.exists(path)


def test_unknown_group_is_a_clear_error(public_dir):
    with pytest.raises(SocketError, match="group 'no-such-group-remp' does not exist"):
        bind_control_socket(os.path.join(public_dir, "rempd.sock"), "no-such-group-remp")


def test_rempctl_exits_2_when_no_daemon_runs(public_dir):
    missing = os.path.join(public_dir, "rempd.sock")
    result = CliRunner().invoke(rempctl_main.app, ["status", "--socket", missing])
    assert result.exit_code == 2
    assert "rempd is not running: no control socket" in result.output
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(missing)
    stale.close()
    result = CliRunner().invoke(rempctl_main.app, ["status", "--socket", missing])
    assert result.exit_code == 2 and "nothing listens" in result.output
