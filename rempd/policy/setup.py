"""The policy runner from the daemon's configuration, with its profiles loaded from the state directory."""
from __future__ import annotations

import logging
from typing import Any

from rempd.config import DaemonConfig
from rempd.policy.decide import PolicyConfig
from rempd.policy.profile import ProfileSet, device_key, profile_path
from rempd.policy.runner import PolicyRunner, RunnerConfig

log = logging.getLogger("rempd.policy")


def make_runner(config: DaemonConfig, model_name: str) -> PolicyRunner:
    devices = device_key(config.devices, config.cpu_workers)
    path = profile_path(config.state_dir, model_name, devices)
    try:
        profiles = ProfileSet.load(path, model_name, devices)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable: serve on, and say so
        log.warning("ignoring the profiles in %s: %s", path, exc)
        profiles = ProfileSet(model_name, devices)
    mode = config.policy
    if mode == "auto" and not profiles.topologies:
        log.warning("policy auto needs profiles and %s has none: starting in manual mode "
                    "(run `rempctl profile`, then `rempctl policy auto`)", path)
        mode = "manual"
    if profiles.topologies:
        log.info("profiles of %s from %s", ", ".join(sorted(profiles.topologies)), path)
    policy = PolicyConfig(slo_ttft=config.slo_ttft, slo_itl=config.slo_itl, window_s=config.policy_window,
                          dwell_s=config.policy_dwell, hysteresis=config.policy_hysteresis)
    return PolicyRunner(RunnerConfig(mode=mode, interval_s=config.policy_interval, topologies=config.policy_topologies,
                                     learn=config.policy_learn, profile_path=path), policy, profiles)


def has_policy_surface(engine: Any) -> bool:
    """Stand-in engines in tests have no inner LLMEngine: no policy for them."""
    return getattr(engine, "engine", None) is not None and hasattr(engine, "plan")
