"""The `rempctl` command. Exit codes: 0 ok, 1 rempd answered with an error, 2 rempd unreachable or refusing."""
from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from rempctl.client import DEFAULT_SOCKET, ControlClient, ControlError, DaemonUnreachable

app = typer.Typer(name="rempctl", help="Control a running rempd through its Unix socket.", no_args_is_help=True,
                  add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

SocketOption = Annotated[str, typer.Option("--socket", envvar="REMP_SOCKET", help="rempd's control socket")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="seconds to wait for an answer")]


@app.callback()
def _root() -> None:
    """Control a running rempd through its Unix socket."""  # keeps `status` a subcommand


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print the daemon's answer as JSON")] = False,
    socket: SocketOption = DEFAULT_SOCKET,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Topology, placement, workers (pid, state, memory, utilisation), requests and KV usage."""
    from rempctl import render  # rich only when there is something to print

    try:
        with ControlClient(socket, timeout) as client:
            answer = client.status()
    except DaemonUnreachable as exc:
        _fail(str(exc), 2)
    except ControlError as exc:
        _fail(str(exc), 1)
    if as_json:
        typer.echo(render.status_json(answer))
    else:
        from rich.console import Console

        render.print_status(answer, Console())


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"rempctl: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app()
