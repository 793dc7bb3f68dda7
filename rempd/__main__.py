"""The `rempd` command: `rempd serve` runs the daemon, `rempd make-checkpoint` writes a test model."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from rempd.config import DEFAULT_CONFIG_PATH, ConfigError, DaemonConfig, find_config_file

app = typer.Typer(name="rempd", help="ReMP: an LLM server whose TP×PP topology changes while it serves.",
                  no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _help(key: str) -> str:
    f = next(f for f in dataclasses.fields(DaemonConfig) if f.name == key)
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "" if default in (None, "") or key == "api_key" else f" (default {default})"
    return f"{f.metadata['help']}{shown}"


def _option(*names: str, key: str, envvar: str | None = None) -> typer.models.OptionInfo:
    # Defaults live in DaemonConfig, not here: None means "not given", so the config file's value stands.
    return typer.Option(*names, help=_help(key), envvar=envvar, show_default=False)


@app.command()
def serve(
    model: Annotated[Optional[str], _option("--model", key="model")] = None,
    devices: Annotated[Optional[str], _option("--devices", key="devices")] = None,
    cpu_workers: Annotated[Optional[int], _option("--cpu-workers", key="cpu_workers")] = None,
    tp: Annotated[Optional[int], _option("--tp", key="tp")] = None,
    pp: Annotated[Optional[int], _option("--pp", key="pp")] = None,
    dtype: Annotated[Optional[str], _option("--dtype", key="dtype")] = None,
    host: Annotated[Optional[str], _option("--host", key="host")] = None,
    port: Annotated[Optional[int], _option("--port", key="port")] = None,
    socket: Annotated[Optional[str], _option("--socket", key="socket", envvar="REMP_SOCKET")] = None,
    socket_group: Annotated[Optional[str], _option("--socket-group", key="socket_group")] = None,
    api_key: Annotated[Optional[str], _option("--api-key", key="api_key", envvar="REMP_API_KEY")] = None,
    served_model_name: Annotated[Optional[str], _option("--served-model-name", key="served_model_name")] = None,
    kv_cache_memory: Annotated[Optional[str], _option("--kv-cache-memory", key="kv_cache_memory")] = None,
    gpu_memory_utilization: Annotated[Optional[float],
                                      _option("--gpu-memory-utilization", key="gpu_memory_utilization")] = None,
    max_num_seqs: Annotated[Optional[int], _option("--max-num-seqs", key="max_num_seqs")] = None,
    max_num_batched_tokens: Annotated[Optional[int],
                                      _option("--max-num-batched-tokens", key="max_num_batched_tokens")] = None,
    max_model_len: Annotated[Optional[int], _option("--max-model-len", key="max_model_len")] = None,
    block_size: Annotated[Optional[int], _option("--block-size", key="block_size")] = None,
    switch_round_bytes: Annotated[Optional[str], _option("--switch-round-bytes", key="switch_round_bytes")] = None,
    switch_mode: Annotated[Optional[str], _option("--switch-mode", key="switch_mode")] = None,
    switch_in_place: Annotated[Optional[str], _option("--switch-in-place", key="switch_in_place")] = None,
    staging_memory: Annotated[Optional[str], _option("--staging-memory", key="staging_memory")] = None,
    staging_chunk_bytes: Annotated[Optional[str], _option("--staging-chunk-bytes", key="staging_chunk_bytes")] = None,
    async_tokens: Annotated[Optional[bool], typer.Option("--async-tokens/--no-async-tokens",
                                                         help=_help("async_tokens"), show_default=False)] = None,
    drain_timeout: Annotated[Optional[float], _option("--drain-timeout", key="drain_timeout")] = None,
    state_dir: Annotated[Optional[str], _option("--state-dir", key="state_dir")] = None,
    policy: Annotated[Optional[str], _option("--policy", key="policy")] = None,
    slo_ttft: Annotated[Optional[float], _option("--slo-ttft", key="slo_ttft")] = None,
    slo_itl: Annotated[Optional[float], _option("--slo-itl", key="slo_itl")] = None,
    policy_window: Annotated[Optional[float], _option("--policy-window", key="policy_window")] = None,
    policy_dwell: Annotated[Optional[float], _option("--policy-dwell", key="policy_dwell")] = None,
    policy_interval: Annotated[Optional[float], _option("--policy-interval", key="policy_interval")] = None,
    policy_hysteresis: Annotated[Optional[float], _option("--policy-hysteresis", key="policy_hysteresis")] = None,
    policy_topologies: Annotated[Optional[str], _option("--policy-topologies", key="policy_topologies")] = None,
    policy_learn: Annotated[Optional[bool], typer.Option("--policy-learn/--no-policy-learn", help=_help("policy_learn"),
                                                         show_default=False)] = None,
    worker_timeout: Annotated[Optional[float], _option("--worker-timeout", key="worker_timeout")] = None,
    max_request_bytes: Annotated[Optional[str], _option("--max-request-bytes", key="max_request_bytes")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help=f"TOML file with any of these options; flags override it (default {DEFAULT_CONFIG_PATH} "
                         "when present)")] = None,
) -> None:
    """Load the model, start the workers and serve the OpenAI-compatible and control APIs."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    try:
        path = find_config_file(config)
        daemon_config = DaemonConfig.from_sources(path, flags)
    except ConfigError as exc:
        typer.echo(f"rempd: {exc}", err=True)
        raise typer.Exit(2) from None
    from rempd import console, daemon  # uvicorn, fastapi and (later) torch: only once the flags are good

    console.configure_logging()
    if path is not None:
        daemon.log.info("configuration from %s", path)
    raise typer.Exit(daemon.run(daemon_config))


@app.command("make-checkpoint")
def make_checkpoint(
    shape: Annotated[str, typer.Option(help="a known shape (e.g. tiny, llama2-7b), or a config.json path")],
    out: Annotated[Path, typer.Option(help="directory to write the checkpoint into")],
    seed: Annotated[int, typer.Option(help="seed of the random weights")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16")] = None,
) -> None:
    """Write a checkpoint with a real model's shapes and seeded random weights (no download)."""
    from rempd.model.make_checkpoint import make_checkpoint_command

    make_checkpoint_command(shape, out, seed, dtype)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
