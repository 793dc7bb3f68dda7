"""Weight-store segments as /dev/shm files: their names and paths, who owns one, and the reclaim of those whose
owner died (a daemon killed with -9 cannot clean up after itself)."""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from rempd.shm_store.manifest import HEADER, SegmentHeader, StoreError

SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "remp-"


def shm_dir() -> Path:
    if not SHM_DIR.is_dir():
        raise StoreError(f"{SHM_DIR} does not exist on this platform ({sys.platform}); "
                         "the ReMP weight store needs Linux POSIX shared memory")
    return SHM_DIR


def shm_path(name: str) -> Path:
    """Path of segment `name` ('/name' as shm_open spells it is accepted too)."""
    bare = name.removeprefix("/")
    if not bare or "/" in bare or bare in (".", "..") or len(bare) > 255 or "\x00" in bare:
        raise StoreError(f"invalid shared-memory segment name {name!r}")
    return shm_dir() / bare


def new_segment_name(prefix: str = DEFAULT_PREFIX) -> str:
    """remp-<uid>-<pid>-<random>: unique across users, daemons and restarts on one machine."""
    return f"{prefix}{os.getuid()}-{os.getpid()}-{secrets.token_hex(6)}"


def process_start(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot, or None if gone or a zombie.

    Exact (no wall-clock arithmetic, unlike psutil's create_time), so a clock step can never
    make a live owner look like a reused pid.
    """
    if not Path("/proc/self/stat").exists():
        raise StoreError("/proc is not mounted: cannot tell live weight-store owners from dead ones")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # comm may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def owner_alive(pid: int, start: int | None) -> bool:
    try:
        now = process_start(pid)
    except PermissionError:
        return True   # cannot tell: keeping a dead segment is a leak, dropping a live one is a crash
    return now is not None and (start is None or now == start)


def unlink_if_owner(path: Path, owner_pid: int) -> None:
    # Runs from a weakref finalizer, possibly at interpreter exit: a forked copy of the owner
    # object must not delete the real owner's segment.
    if os.getpid() == owner_pid:
        path.unlink(missing_ok=True)


def reclaim_stale_segments(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Unlink this user's segments named prefix* whose owner process is dead; return their names.

    The owner is the pid + start time in the header (which tells a reused pid apart); a segment
    whose header is not written yet falls back to the pid in a remp-<uid>-<pid>-... name, and one
    we cannot attribute at all is left alone.
    """
    reclaimed = []
    for dirent in os.scandir(shm_dir()):
        if not dirent.name.startswith(prefix):
            continue
        try:
            if dirent.stat().st_uid != os.getuid():
                continue
            with open(dirent.path, "rb") as f:
                raw = f.read(HEADER.size)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            header = SegmentHeader.unpack(raw, dirent.path)
            pid, start = header.owner_pid, header.owner_start
        except StoreError:
            parts = dirent.name[len(prefix):].split("-")
            if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                continue
            pid, start = int(parts[1]), None
        if owner_alive(pid, start):
            continue
        try:
            os.unlink(dirent.path)
        except FileNotFoundError:
            continue   # another process reclaimed it first
        reclaimed.append(dirent.name)
    return reclaimed
