"""How rempctl shows answers: rich tables for people, --json for scripts (the daemon's own dicts).

Plans and switch reports arrive as plain JSON dicts (rempd.migrate.report.SwitchReport and
rempd.migrate.predict.plan_summary): they are rendered from the dicts, because importing those
modules would pull numpy and scipy into a CLI that must start fast.
"""
from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table

from rempd.protocol import StatusResponse, WorkerStatus

# rempd.migrate.report's PHASES and STAGED_PHASES
PHASES = ("plan", "quiesce", "groups", "transform", "commit", "resume")
STAGED_PHASES = ("plan", "give_back", "groups", "stage", "precopy", "quiesce", "delta", "commit", "resume")
STATE_STYLE = {"serving": "green", "starting": "yellow", "recovering": "yellow", "draining": "yellow",
               "failed": "red", "active": "green", "standby": "cyan", "dead": "red", "restarting": "yellow",
               "committed": "green", "running": "yellow", "rolled_back": "red", "refused": "red"}


def status_json(status: StatusResponse) -> str:
    return as_json(status.to_dict())


def as_json(answer: Any) -> str:
    return json.dumps(answer, indent=2, ensure_ascii=False)


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
    if status.last_recovery:
        console.print(f"  recovery   {status.last_recovery}")
    for lost in status.lost_devices:
        console.print(f"  [red]lost[/red]       {lost}")
    if status.policy is not None:
        from rempctl.policy_render import status_line

        console.print(status_line(status.policy))
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


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def target_of(report: dict) -> str:
    """The target with its placement: "TP4PP1 on [0,2,1,3]" (a plan's target already says where)."""
    target, workers = str(report.get("target", "?")), report.get("placement")
    match = re.fullmatch(r"TP(\d+)PP(\d+)", target)
    return f"{target} on {placement(workers, int(match[1]))}" if match and workers else target


def print_plan(plan: dict, console: Console) -> None:
    target = target_of(plan).split(" on ")[0]  # the placement gets a line of its own
    console.print(f"plan from {plan.get('source', '?')} to [bold]{target}[/bold]")
    console.print(f"  placement  {placement(plan.get('placement') or [], int(plan.get('tp') or 1))}"
                  f"    live KV blocks {plan.get('kv_blocks', 0)}")
    console.print(bytes_table(plan.get("bytes_by_source") or {}))
    console.print(phases_table(plan.get("predicted") or {}))
    links = plan.get("links")
    if links:
        console.print(f"  links: host {links['host_gbps']:.2f} GB/s, peer {links['peer_gbps']:.2f} GB/s, "
                      f"local {links['local_gbps']:.2f} GB/s; new group {seconds(links['group_seconds'])}, "
                      f"worker round trip {seconds(links['rpc_seconds'])}")


def bytes_table(by_source: dict[str, int]) -> Table:
    """Bytes each kind of data moves, cheapest path first: stays on its device, from a peer, from host."""
    table = Table(box=None, pad_edge=False, header_style="bold", title="bytes by source", title_justify="left")
    for name in ("", "stay", "peer", "host"):
        table.add_column(name, justify="right" if name else "left")
    for kind, label in (("weights", "weights"), ("kv", "KV cache")):
        # KV has no host copy: it only ever lives on the workers
        cells = [size(by_source[f"{kind}_{src}"]) if f"{kind}_{src}" in by_source else "-"
                 for src in ("stay", "peer", "host")]
        table.add_row(label, *cells)
    return table


def phases_of(report: dict) -> tuple[str, ...]:
    return STAGED_PHASES if report.get("mode") == "staged" else PHASES


def phases_table(predicted: dict[str, float], measured: dict[str, float] | None = None, total: float | None = None,
                 detail: dict[str, float] | None = None, current: str | None = None,
                 elapsed: float | None = None, phases: tuple[str, ...] = PHASES) -> Table:
    """Seconds per phase, measured (if given) beside predicted; `current` is the phase running now (live view)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("phase")
    if measured is not None:
        table.add_column("measured", justify="right")
    table.add_column("predicted", justify="right")
    for phase in phases:
        row: list[RenderableType] = [phase]
        if measured is not None:
            if phase in measured:
                row.append(seconds(measured[phase]))
            elif phase == current:
                row.append(Spinner("dots", text=seconds(elapsed), style="yellow"))
            else:
                row.append("")
        table.add_row(*row, seconds(predicted.get(phase)), end_section=phase == phases[-1])
        if phase == "transform" and measured is not None:
            # the slowest worker's steps: where the transform's time went
            for step, value in (detail or {}).items():
                table.add_row(f"  [dim]{step}[/dim]", f"[dim]{seconds(value)}[/dim]", "")
    row = ["[bold]total[/bold]"]
    if measured is not None:
        row.append(f"[bold]{seconds(total if total is not None else sum(measured.values()))}[/bold]")
    table.add_row(*row, f"[bold]{seconds(predicted.get('total'))}[/bold]")
    return table


def progress(report: dict, predicted: dict[str, float], elapsed: float, phase_elapsed: float) -> RenderableType:
    """The live view while a switch runs: finished phases with their times, a spinner on the current one."""
    title = f"switch {report['id']} from {report.get('source', '?')} to {target_of(report)}"
    return Group(title, phases_table(report.get("predicted") or predicted, report.get("phases") or {}, elapsed,
                                     current=report.get("phase"), elapsed=phase_elapsed, phases=phases_of(report)))


def print_report(report: dict, console: Console) -> None:
    state = report.get("state", "?")
    console.print(f"switch {report.get('id')} {_styled(state)} in {seconds(report.get('total_seconds'))}: "
                  f"from {report.get('source', '?')} to [bold]{target_of(report)}[/bold]")
    console.print(mode_line(report))
    console.print(phases_table(report.get("predicted") or {}, report.get("phases") or {},
                               report.get("total_seconds"), report.get("transform_detail"), phases=phases_of(report)))
    console.print(f"  KV blocks migrated {report.get('kv_blocks_migrated', 0)}    requests live "
                  f"{report.get('requests_live', 0)}    preempted {report.get('requests_preempted', 0)}")
    if report.get("mode") == "staged":
        console.print(f"  KV blocks pre-copied while serving {report.get('kv_blocks_precopied', 0)}, "
                      f"sent at the cut {report.get('kv_blocks_delta', 0)}")
    if report.get("kv_blocks_given_back"):
        console.print(f"  free KV blocks given back to stage the target {report['kv_blocks_given_back']}")
    pause = report.get("serving_pause_s")
    give_back = report.get("give_back_pause_s")
    console.print(f"  [bold]serving pause[/bold] {seconds(pause) if pause is not None else 'not measured'} "
                  f"(cut {seconds(report.get('cut_seconds'))}"
                  f"{f', giving blocks back {seconds(give_back)}' if give_back else ''})"
                  f" of {seconds(report.get('total_seconds'))} in all")
    if report.get("bytes_by_source"):
        console.print(bytes_table(report["bytes_by_source"]))
    if report.get("error"):
        console.print(f"  [red]error: {escape(str(report['error']))}[/red]")


def mode_line(report: dict) -> str:
    """How the switch ran: staged (and how long the old topology served meanwhile), or stop-the-world and why."""
    if report.get("mode") == "staged":
        return f"  mode staged: prepared for {seconds(report.get('staging_seconds'))} while serving, then a cut"
    reason = report.get("mode_reason")
    return "  mode stop-the-world" + (f" [yellow](staging fell back: {escape(reason)})[/yellow]" if reason else "")


def switches_table(reports: list[dict]) -> Table:
    """One row per switch; times in ms, without units, so that a dozen columns fit a terminal."""
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold",
                  caption="times in ms; pause: last token before the cut to the first after it, cut: the engine "
                          "did not step; mode stop* = staging fell back", caption_justify="left")
    for name in ("id", "switch", "state", "mode", "pause", "cut", "total", *PHASES, "KV blocks", "preempted",
                 "placement"):
        table.add_column(name, justify="left" if name in ("id", "switch", "state", "mode", "placement") else "right")
    for r in reports:
        phases = r.get("phases") or {}
        total = r.get("total_seconds") if r.get("state") != "running" else None
        source, target = (str(r.get(k, "?")).split(" on ")[0] for k in ("source", "target"))
        mode = {"staged": "staged", "stop_the_world": "stop"}.get(r.get("mode", ""), "-")
        if r.get("mode_reason"):
            mode += "*"  # a staged request that fell back; the report says why
        table.add_row(str(r.get("id")), f"{source} → {target}", _styled(str(r.get("state"))), mode,
                      _ms(r.get("serving_pause_s")), _ms(r.get("cut_seconds")), _ms(total),
                      *[_ms(phases.get(p)) for p in PHASES], str(r.get("kv_blocks_migrated", 0)),
                      str(r.get("requests_preempted", 0)), target_of(r).partition(" on ")[2] or "-")
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state
