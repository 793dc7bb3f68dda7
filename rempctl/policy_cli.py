"""`rempctl policy show | auto | manual` and `rempctl profile`: the automatic topology policy and its profiles."""
from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from rempctl.client import DEFAULT_SOCKET, ControlClient

SocketOption = Annotated[str, typer.Option("--socket", envvar="REMP_SOCKET", help="rempd's control socket")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the daemon's answer as JSON")]
SloTtft = Annotated[float | None, typer.Option("--slo-ttft", min=0.001,
                                               help="objective for the p90 time to first token, seconds")]
SloItl = Annotated[float | None, typer.Option("--slo-itl", min=0.0001,
                                              help="objective for the p90 over requests of each one's inter-token "
                                                   "latency, seconds")]

policy_app = typer.Typer(help="The automatic topology policy: show it, turn it on (auto) or off (manual).",
                         no_args_is_help=True)


def _main() -> Any:
    from rempctl import main  # errors, console and exit codes are main's; imported late to avoid a cycle

    return main


def _set(mode: str | None, slo_ttft: float | None, slo_itl: float | None, as_json: bool, socket: str) -> None:
    from rempctl import policy_render, render

    main = _main()
    body = {k: v for k, v in {"mode": mode, "slo_ttft": slo_ttft, "slo_itl": slo_itl}.items() if v is not None}
    with main._errors(), ControlClient(socket, 10.0) as client:
        answer = client.request("POST", "/v1/policy", body) if body else client.get("/v1/policy")
    if as_json:
        typer.echo(render.as_json(answer))
    else:
        policy_render.print_policy(answer, main._console())


@policy_app.command("show")
def show(as_json: JsonOption = False, socket: SocketOption = DEFAULT_SOCKET) -> None:
    """Mode, objectives, the load in the window, each topology's predicted score, and recent decisions."""
    _set(None, None, None, as_json, socket)


@policy_app.command("auto")
def auto(slo_ttft: SloTtft = None, slo_itl: SloItl = None, as_json: JsonOption = False,
         socket: SocketOption = DEFAULT_SOCKET) -> None:
    """Let rempd choose the topology (needs profiles: `rempctl profile`)."""
    _set("auto", slo_ttft, slo_itl, as_json, socket)


@policy_app.command("manual")
def manual(slo_ttft: SloTtft = None, slo_itl: SloItl = None, as_json: JsonOption = False,
           socket: SocketOption = DEFAULT_SOCKET) -> None:
    """Topology changes only by `rempctl switch`; the policy keeps observing and shows its advice."""
    _set("manual", slo_ttft, slo_itl, as_json, socket)


def profile(
    topologies: Annotated[str | None, typer.Option(help="e.g. TP4PP1,TP1PP4; every valid one if omitted")] = None,
    concurrency: Annotated[str, typer.Option(help="closed-loop concurrency levels")] = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="requests per level")] = 16,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="prompt tokens of each synthetic request")] = 128,
    output_tokens: Annotated[int, typer.Option(min=1, help="tokens each synthetic request generates")] = 64,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="start the sweep and return")] = False,
    as_json: JsonOption = False, socket: SocketOption = DEFAULT_SOCKET,
) -> None:
    """Measure every topology's throughput ceiling and latency (a short sweep rempd runs, switching through
    each topology and back); kept on disk per model and device set for the policy."""
    from rempctl import policy_render, render

    main = _main()
    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{concurrency!r} is not a list such as 1,4,16", param_hint="--concurrency") from None
    body: dict[str, Any] = {"concurrency": levels, "requests": requests, "prompt_tokens": prompt_tokens,
                            "output_tokens": output_tokens}
    if topologies:
        body["topologies"] = [t.strip() for t in topologies.split(",") if t.strip()]
    with main._errors(), ControlClient(socket, 30.0) as client:
        answer = client.request("POST", "/v1/profile", body)
        shown = ""
        while not no_wait and answer["state"] == "running":
            if answer.get("progress") and answer["progress"] != shown and not as_json:
                shown = answer["progress"]
                typer.echo(f"  {shown}", err=True)
            time.sleep(0.5)
            answer = client.get("/v1/profile")
    if as_json:
        typer.echo(render.as_json(answer))
    else:
        policy_render.print_sweep(answer, main._console())
    if answer["state"] == "failed":
        main._fail(f"profile sweep failed: {answer.get('error')}", 1)
