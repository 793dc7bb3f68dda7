"""The control socket: bound by rempd itself (uvicorn would make it 0666) and checked per connection.

Two fences: the file is 0660 in a 0750 directory, owned by the configured group, and every
connection's SO_PEERCRED must be root, the daemon's own uid, or a member of that group. A caller
past the first fence but not the second gets a 403 before any route runs.
"""
from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from rempd.api.errors import error_response

log = logging.getLogger("rempd.control")
SOCKET_MODE = 0o660
DIR_MODE = 0o750


class SocketError(RuntimeError):
    """The control socket cannot be set up; the message says what to change."""


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class PeerPolicy:
    uid: int  # the daemon's
    gid: int  # the group allowed in

    @classmethod
    def for_group(cls, group: str | None) -> "PeerPolicy":
        return cls(os.geteuid(), resolve_group(group))

    def allows(self, peer: Credentials) -> bool:
        return peer.uid in (0, self.uid) or self.gid in _groups_of(peer)

    def describe(self) -> str:
        return f"root, uid {self.uid} or group {_group_name(self.gid)}"


@dataclass
class BoundSocket:
    sock: socket.socket
    path: str

    def remove(self) -> None:
        """Close, and unlink the file unless another daemon has since bound the path and listens on it."""
        self.sock.close()
        if not _is_listening(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _is_listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def resolve_group(group: str | None) -> int:
    """A group name or gid; None is the daemon's own group."""
    if group is None:
        return os.getegid()
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(f"socket group {group!r} does not exist (create it, or set socket-group to "
                          "an existing group)") from None


def bind_control_socket(path: str, group: str | None = None, backlog: int = 64) -> BoundSocket:
    gid = resolve_group(group)
    if len(os.fsencode(path)) >= 108:
        raise SocketError(f"{path}: a Unix socket path must be shorter than 108 bytes")
    _ensure_directory(os.path.dirname(path) or ".", gid)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # born 0600: never a moment when others may connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chown(path, -1, gid)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except PermissionError as exc:
        sock.close()
        raise SocketError(f"{path}: {exc.strerror} (is the daemon in group {_group_name(gid)}?)") from exc
    except OSError as exc:
        sock.close()
        raise SocketError(f"{path}: cannot bind the control socket: {exc.strerror}") from exc
    sock.setblocking(False)
    return BoundSocket(sock, path)


def _ensure_directory(directory: str, gid: int) -> None:
    if os.path.isdir(directory):
        return  # systemd's RuntimeDirectory= (or the operator) owns its mode
    try:
        os.mkdir(directory, DIR_MODE)
        os.chown(directory, -1, gid)
        os.chmod(directory, DIR_MODE)  # mkdir's mode passes through the umask
    except FileNotFoundError:
        raise SocketError(f"{directory}: its parent does not exist") from None
    except PermissionError:
        raise SocketError(f"cannot create {directory}: permission denied; run rempd under systemd "
                          "(RuntimeDirectory=remp) or pass --socket in a directory you own") from None


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left by a daemon that died: nobody listens
        return
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise SocketError(f"{path}: cannot check whether a daemon is listening: {exc.strerror}") from exc
    finally:
        probe.close()
    raise SocketError(f"another rempd is already listening on {path}")


def peer_credentials(sock: Any) -> Credentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Credentials(*struct.unpack("3i", raw))


def _groups_of(peer: Credentials) -> set[int]:
    """The peer's primary and supplementary groups: the process's own when /proc shows it, else the user's."""
    groups = {peer.gid}
    try:
        with open(f"/proc/{peer.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return groups | {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    with contextlib.suppress(KeyError):
        groups.update(os.getgrouplist(pwd.getpwuid(peer.uid).pw_name, peer.gid))
    return groups


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class PeerGate:
    """ASGI wrapper for one connection: 403 for a refused peer, else the peer rides along in the scope."""

    def __init__(self, app: Any, peer: Credentials, policy: PeerPolicy):
        self.app, self.peer, self.policy = app, peer, policy
        self.allowed = policy.allows(peer)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.allowed:
            log.warning("refused control request %s %s from uid %d (pid %d)", scope.get("method"),
                        scope.get("path"), self.peer.uid, self.peer.pid)
            response = error_response(403, f"uid {self.peer.uid} may not use the rempd control socket; "
                                      f"it admits {self.policy.describe()}", code="peer_not_allowed")
            return await response(scope, receive, send)
        await self.app({**scope, "remp.peer": self.peer}, receive, send)


def peer_checked_protocol(policy: PeerPolicy) -> type:
    """A uvicorn HTTP protocol class that reads SO_PEERCRED when a connection is made."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCheckedH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = peer_credentials(transport.get_extra_info("socket"))
            self.client = (f"uid={peer.uid}", peer.pid)  # what uvicorn's logs print for the caller
            self.app = PeerGate(self.app, peer, policy)

    return PeerCheckedH11
