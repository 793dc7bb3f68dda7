"""The `rempctl` command. Exit codes: 0 ok, 1 rempd answered with an error (or a switch did not commit),
2 rempd unreachable or refusing this caller, 130 interrupted while watching a switch (which goes on)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer

from rempctl.client import DEFAULT_SOCKET, ControlClient, ControlError, DaemonUnreachable

app = typer.Typer(name="rempctl", help="Control a running rempd through its Unix socket.", no_args_is_help=True,
                  add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

PAUSE_WAIT_SECONDS = 2.0  # at most this long for the first token after a switch, to show the pause
POLL_SECONDS = 0.05  # how often a watched switch's report is fetched

SocketOption = Annotated[str, typer.Option("--socket", envvar="REMP_SOCKET", help="rempd's control socket")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="seconds to wait for an answer")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the daemon's answer as JSON")]
TpOption = Annotated[int, typer.Option("--tp", min=1, help="target tensor-parallel degree")]
PpOption = Annotated[int, typer.Option("--pp", min=1, help="target pipeline-parallel degree")]
PlacementOption = Annotated[str | None, typer.Option(
    "--placement", help="worker of every (pp_rank, tp_rank), e.g. 0,1,2,3; if omitted rempd picks the one that "
                        "moves the fewest bytes")]


@app.callback()
def _root() -> None:
    """Control a running rempd through its Unix socket."""  # keeps `status` a subcommand


@app.command()
def status(as_json: JsonOption = False, socket: SocketOption = DEFAULT_SOCKET, timeout: TimeoutOption = 10.0) -> None:
    """Topology, placement, workers (pid, state, memory, utilisation), requests and KV usage."""
    from rempctl import render  # rich only when there is something to print

    with _errors(), ControlClient(socket, timeout) as client:
        answer = client.status()
    if as_json:
        typer.echo(render.status_json(answer))
    else:
        render.print_status(answer, _console())


@app.command()
def plan(tp: TpOption, pp: PpOption, placement: PlacementOption = None, as_json: JsonOption = False,
         socket: SocketOption = DEFAULT_SOCKET, timeout: TimeoutOption = 60.0) -> None:
    """What a switch to TP×PP would do (placement, bytes per source, predicted seconds per phase); changes nothing."""
    with _errors(), ControlClient(socket, timeout) as client:
        answer = client.plan(_target(tp, pp, placement))
    _show_plan(answer, as_json)


@app.command()
def switch(
    tp: TpOption, pp: PpOption, placement: PlacementOption = None, as_json: JsonOption = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the switch id and return at once")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only, as `rempctl plan` does")] = False,
    staged: Annotated[bool | None, typer.Option(
        "--staged/--stop-the-world", show_default=False,
        help="staged: prepare the new topology while the old one serves, then pause only for a short cut "
             "(stop-the-world if staging cannot fit, as the report says); stop-the-world: pause for the whole "
             "switch. Default: rempd's switch_mode, stop-the-world unless configured")] = None,
    socket: SocketOption = DEFAULT_SOCKET, timeout: TimeoutOption = 60.0,
) -> None:
    """Switch to TP×PP while serving, watching each phase; exits 0 once committed, 1 if it was not."""
    from rempctl import render

    target = _target(tp, pp, placement)
    if staged is not None:
        target["mode"] = "staged" if staged else "stop_the_world"
    report: dict[str, Any] | None = None
    try:
        with _errors(), ControlClient(socket, timeout) as client:
            if dry_run:
                _show_plan(client.switch(target, dry_run=True)["plan"], as_json)
                return
            report = client.switch(target)
            if no_wait:
                typer.echo(render.as_json(report) if as_json else report["id"])
                return
            report = _watch(client, report, quiet=as_json)
    except KeyboardInterrupt:
        # The switch is the daemon's transaction: leaving it alone is the only safe thing a client can do.
        what = f"switch {report['id']} goes on in rempd" if report else "the switch may have started in rempd"
        _fail(f"stopped watching; {what} (follow it with `rempctl switches`)", 130)
    if as_json:
        typer.echo(render.as_json(report))
    else:
        render.print_report(report, _console())
    if report["state"] != "committed":
        _fail(f"switch {report['id']} {report['state']}: {report.get('error') or 'no reason given'}", 1)


@app.command()
def switches(as_json: JsonOption = False, socket: SocketOption = DEFAULT_SOCKET,
             timeout: TimeoutOption = 10.0) -> None:
    """Every switch since rempd started: source → target, state, seconds per phase, KV blocks, preemptions."""
    from rempctl import render

    with _errors(), ControlClient(socket, timeout) as client:
        history = client.switches()
    if as_json:
        typer.echo(render.as_json(history))
    elif not history:
        typer.echo("no switches yet")
    else:
        _console().print(render.switches_table(history))


def _watch(client: ControlClient, report: dict, quiet: bool) -> dict:
    """Polls the report until the switch ends, showing a live table of its phases on a terminal."""
    from rich.live import Live

    from rempctl import render

    console = _console()
    if quiet or not console.is_terminal:  # logs and pipes get the final report only
        return _poll(client, report)
    clock = _PhaseClock()
    predicted = (report.get("plan") or {}).get("predicted") or {}

    def view(r: dict) -> Any:
        return render.progress(r, predicted, clock.total(), clock.phase(r.get("phase")))
    with Live(view(report), console=console, transient=True, refresh_per_second=12) as live:
        return _poll(client, report, lambda r: live.update(view(r)))


def _poll(client: ControlClient, report: dict, on_update: Callable[[dict], None] | None = None) -> dict:
    while report["state"] == "running":
        time.sleep(POLL_SECONDS)
        report = client.switch_report(report["id"])
        if on_update is not None:
            on_update(report)
    # the serving pause ends with the first token after the switch: give live requests a moment to get it
    deadline = time.monotonic() + PAUSE_WAIT_SECONDS
    while report.get("requests_live") and report.get("serving_pause_s") is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        report = client.switch_report(report["id"])
    return report


class _PhaseClock:
    """Seconds since the switch began and since its current phase was first seen (the report has no clock)."""

    def __init__(self) -> None:
        self.started = self.phase_started = time.monotonic()
        self.current: str | None = None

    def total(self) -> float:
        return time.monotonic() - self.started

    def phase(self, name: str | None) -> float:
        if name != self.current:
            self.current, self.phase_started = name, time.monotonic()
        return time.monotonic() - self.phase_started


def _show_plan(answer: dict, as_json: bool) -> None:
    from rempctl import render

    if as_json:
        typer.echo(render.as_json(answer))
    else:
        render.print_plan(answer, _console())


def _target(tp: int, pp: int, placement: str | None) -> dict[str, Any]:
    target: dict[str, Any] = {"tp": tp, "pp": pp}
    if placement is not None:
        try:
            target["placement"] = [int(w) for w in placement.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{placement!r} is not a list of workers such as 0,1,2,3",
                                     param_hint="--placement") from None
    return target


@contextmanager
def _errors() -> Iterator[None]:
    """Turns client failures into a message and an exit code."""
    try:
        yield
    except DaemonUnreachable as exc:
        _fail(str(exc), 2)
    except ControlError as exc:
        hint = " (watch it with `rempctl switches`)" if exc.status_code == 409 else ""
        _fail(f"{exc}{hint}", 1)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"rempctl: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app()


def _add_policy_commands() -> None:
    from rempctl.policy_cli import policy_app, profile

    app.add_typer(policy_app, name="policy")
    app.command("profile")(profile)


_add_policy_commands()
