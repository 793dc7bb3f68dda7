"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, a no-op when it is unset."""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("rempd.systemd")


def notify(*fields: str) -> bool:
    """Send KEY=value fields in one datagram; True when systemd (or a test) was there to hear it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path[0] not in ("/", "@"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", path)
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        # Losing a STATUS= line must never take the daemon down.
        log.warning("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def reloading(status: str | None = None) -> bool:
    # systemd >= 253 fails the reload unless MONOTONIC_USEC comes with RELOADING=1.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={status}"] if status else []))
