"""How rempctl shows answers: rich tables for people, --json for scripts (the protocol's own dicts)."""
from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from rempd.protocol import StatusResponse, WorkerStatus

STATE_STYLE = {"serving": "green", "starting": "yellow", "recovering": "yellow", "draining": "yellow",
               "failed": "red", "active": "green", "standby": "cyan", "dead": "red", "restarting": "yellow"}


def status_json(status: StatusResponse) -> str:
    return json.dumps(status.to_dict(), indent=2)


def print_status(status: StatusResponse, console: Console) -> None:
    state = _styled(status.state)
    topology = f"TP{status.topology.tp}·PP{status.topology.pp}" if status.topology else "no topology yet"
    console.print(f"rempd {status.version}  {state}  {status.model or ''}  {topology}  "
                  f"pid {status.pid}, up {duration(status.uptime_s)}")
    if status.state == "starting":
        console.print(f"  {status.progress or 'starting'}")
        return
    if status.topology:
        console.print(f"  placement  {placement(status.placement, status.topology.tp)}")
    console.print(f"  requests   {status.requests_running} running, {status.requests_waiting} waiting, "
                  f"{status.num_preempted} preempted since start")
    console.print(f"  KV cache   {status.kv_blocks_used}/{status.kv_blocks_total} blocks ({status.kv_usage:.1%})"
                  f"    worker recoveries {status.num_recoveries}")
    if status.workers:
        console.print(workers_table(status.workers))


def workers_table(workers: list[WorkerStatus]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in [("worker", "right"), ("device", "left"), ("pid", "right"), ("state", "left"),
                          ("pp,tp", "left"), ("weights", "right"), ("KV blocks", "right"),
                          ("memory", "right"), ("util", "right")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for w in workers:
        rank = f"{w.pp_rank},{w.tp_rank}" if w.pp_rank is not None else "-"
        memory = (f"{size(w.memory_used_bytes)}/{size(w.memory_total_bytes)}"
                  if w.memory_used_bytes is not None and w.memory_total_bytes is not None else "-")
        util = f"{w.utilization_pct:.0f}%" if w.utilization_pct is not None else "-"
        table.add_row(str(w.index), w.device, str(w.pid or "-"), _styled(w.state), rank, size(w.weight_bytes),
                      str(w.kv_blocks), memory, util)
    return table


def placement(workers: list[int], tp: int) -> str:
    """Worker indices per pipeline stage: "[0,1] → [2,3]"."""
    stages = [workers[i:i + tp] for i in range(0, len(workers), tp)]
    return " → ".join("[" + ",".join(map(str, stage)) + "]" for stage in stages) or "-"


def size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state
