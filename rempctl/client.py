"""HTTP/JSON over rempd's control socket, with failures turned into messages an operator can act on."""
from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from typing import Any, Self

import httpx

from rempd.protocol import ProtocolError, StatusResponse

DEFAULT_SOCKET = "/run/remp/rempd.sock"  # rempd.config.DEFAULT_SOCKET; not imported, to keep start-up light


class DaemonUnreachable(Exception):
    """rempd is not running, or its socket refuses this caller (exit code 2)."""


class ControlError(Exception):
    """rempd answered, but with an error (exit code 1). `code` is the error body's code, e.g. switch_refused."""

    def __init__(self, message: str, status_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class ControlClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_s: float = 10.0):
        self.socket_path = socket_path
        # The host part of the URL is never resolved: the transport always dials the socket.
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://rempd",
                                 timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def status(self) -> StatusResponse:
        try:
            return StatusResponse.from_dict(self.get("/v1/status"))
        except ProtocolError as exc:
            raise ControlError(f"unexpected answer from rempd: {exc}") from None

    def plan(self, target: dict[str, Any]) -> dict:
        """The plan summary of `target` ({"tp", "pp", "placement"?}); nothing changes in rempd."""
        return self.request("POST", "/v1/plan", target)

    def switch(self, target: dict[str, Any], dry_run: bool = False) -> dict:
        """Starts a switch and returns its first report at once (202); dry_run gives {"dry_run", "plan"}."""
        return self.request("POST", "/v1/switch", {**target, "dry_run": dry_run})

    def switches(self) -> list[dict]:
        return self.request("GET", "/v1/switches")

    def switch_report(self, switch_id: str) -> dict:
        return self.request("GET", f"/v1/switches/{switch_id}")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise DaemonUnreachable(f"rempd did not answer on {self.socket_path} in time") from None
        except httpx.TransportError:
            raise DaemonUnreachable(diagnose(self.socket_path)) from None
        answer = _json(response)
        if response.is_success:
            return answer
        message = _error_message(answer) or f"HTTP {response.status_code}"
        if response.status_code == 403:
            raise DaemonUnreachable(f"rempd refused this caller: {message}")
        code = answer["error"].get("code") if _error_message(answer) is not None else None
        raise ControlError(f"rempd: {message}", response.status_code, code)


def diagnose(path: str) -> str:
    """Why a connection to `path` failed, in words that say what to do."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return (f"rempd is not running: no control socket at {path} "
                "(start it with `systemctl start rempd`, or point --socket / REMP_SOCKET at it)")
    except PermissionError:
        return f"cannot reach {path}: permission denied on its directory ({_access_hint(os.path.dirname(path))})"
    if not stat.S_ISSOCK(mode):
        return f"{path} is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except PermissionError:
        return f"cannot connect to {path}: permission denied ({_access_hint(path)})"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return f"rempd is not running: nothing listens on {path} (a socket left by a daemon that died?)"
        return f"cannot connect to {path}: {exc.strerror}"
    finally:
        probe.close()
    return f"rempd on {path} closed the connection"


def _access_hint(path: str) -> str:
    try:
        gid = os.stat(path).st_gid
        group = grp.getgrgid(gid).gr_name
    except (OSError, KeyError):
        return "run as root or as a member of the socket's group"
    return f"run as root or as a member of group {group!r}"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return None
