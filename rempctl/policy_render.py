"""How rempctl shows the policy (`rempctl policy show`) and a profile sweep (`rempctl profile`)."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rempctl.render import seconds

ACTION_STYLE = {"switch": "yellow", "hold": "cyan", "stay": "green"}


def print_policy(answer: dict, console: Console) -> None:
    c = answer.get("config") or {}
    console.print(f"policy [bold]{answer.get('mode')}[/bold]   objectives: TTFT p90 ≤ {c.get('slo_ttft')} s, "
                  f"ITL p90 ≤ {c.get('slo_itl')} s   window {c.get('window_s')} s, dwell {c.get('dwell_s')} s, "
                  f"hysteresis {c.get('hysteresis')}")
    obs = answer.get("observation")
    if obs:
        console.print(f"  window     {obs['arrival_rate']:.2f} req/s in, {obs['completion_rate']:.2f} out, "
                      f"queue {obs['queue_len']:.1f}, KV {obs['kv_usage']:.0%}, TTFT p90 {seconds(obs.get('ttft_p90'))}, "
                      f"ITL p90 {seconds(obs.get('itl_p90'))}")
    decision = answer.get("decision")
    if decision:
        console.print(f"  now        {decision['current']} at load {decision['load']:.2f} req/s")
        console.print(candidates_table(decision.get("candidates") or [], decision["current"]))
    path = answer.get("profile_path")
    profiled = sorted((answer.get("profiles") or {}).get("topologies") or {})
    console.print(f"  profiles   {', '.join(profiled) or 'none (run `rempctl profile`)'}  [dim]{path or ''}[/dim]")
    decisions = answer.get("decisions") or []
    if decisions:
        console.print(decisions_table(decisions))


def candidates_table(candidates: list[dict], current: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", title="predicted at this load", title_justify="left")
    for name in ("topology", "score", "cost", "ceiling req/s", "may enter"):
        table.add_column(name, justify="left" if name == "topology" else "right")
    for c in sorted(candidates, key=lambda c: c["topology"]):
        mark = " ◀" if c["topology"] == current else ""
        table.add_row(c["topology"] + mark, _n(c.get("score")), _n(c.get("cost")), _n(c.get("ceiling")),
                      "yes" if c.get("enterable") else "no")
    return table


def decisions_table(decisions: list[dict]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", title="decisions", title_justify="left")
    for name in ("time", "action", "from", "to", "reason"):
        table.add_column(name)
    for d in decisions[-10:]:
        style = ACTION_STYLE.get(d["action"], "")
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d.get("time", 0))), f"[{style}]{d['action']}[/{style}]",
                      d["current"], d.get("target") or "-", escape(d["reason"]))
    return table


def print_sweep(answer: dict, console: Console) -> None:
    state = answer.get("state")
    seconds = answer.get("seconds")
    console.print(f"profile sweep {state}" + (f" in {seconds:.1f} s" if seconds else ""))
    if answer.get("error"):
        console.print(f"  [red]error: {escape(str(answer['error']))}[/red]")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("topology", "ceiling req/s", "points (req/s: TTFT p90 / ITL p90)"):
        table.add_column(name)
    for name, measured in sorted((answer.get("measured") or {}).items()):
        if "error" in measured:
            table.add_row(name, "-", f"[red]{escape(measured['error'])}[/red]")
            continue
        points = "; ".join(f"{p['rate']:.2f}: {seconds(p['ttft'])} / {seconds(p['itl'])}" for p in measured["points"])
        table.add_row(name, f"{measured['ceiling']:.2f}", points)
    console.print(table)
    if answer.get("profile_path"):
        console.print(f"  kept in {answer['profile_path']}")


def status_line(policy: Any) -> str:
    """One line of `rempctl status` (policy is a protocol.PolicyStatus)."""
    line = (f"  policy     {policy.mode}, TTFT p90 ≤ {policy.slo_ttft} s, ITL p90 ≤ {policy.slo_itl} s"
            + (f", load {policy.load:.2f} req/s" if policy.load is not None else "")
            + (f", profiles {','.join(policy.profiled)}" if policy.profiled else ", no profiles"))
    d = policy.decision
    if d is not None:
        target = f" → {d.target}" if d.target else ""
        line += f"\n  decision   {d.action} {d.current}{target}: {escape(d.reason)}"
    return line


def _n(value: float | None) -> str:
    return "∞" if value is None else f"{value:.3f}"
