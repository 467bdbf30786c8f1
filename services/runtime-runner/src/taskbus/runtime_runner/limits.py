"""Pure: the resources a sandbox gets, from what its conversation asked for and the operator's
defaults and maxima, and how they read as Docker host-config limits."""

from __future__ import annotations

from typing import Any

import msgspec

from taskbus.contracts.specs import NetworkMode, Resources
from taskbus.runtime_runner.settings import RuntimeRunnerSettings


class SandboxResources(msgspec.Struct, frozen=True, kw_only=True):
    """The limits one sandbox runs with."""

    cpus: float
    memory_mb: int
    pids: int
    network: NetworkMode


def effective_resources(requested: Resources, settings: RuntimeRunnerSettings) -> SandboxResources:
    """The request where given, else the operator's default; never above the maximum."""
    network = requested.network or settings.sandbox_network
    if not settings.sandbox_network_allowed:
        network = NetworkMode.NONE
    return SandboxResources(
        cpus=min(requested.cpus or settings.sandbox_cpus, settings.max_sandbox_cpus),
        memory_mb=min(
            requested.memory_mb or settings.sandbox_memory_mb, settings.max_sandbox_memory_mb
        ),
        pids=min(requested.pids or settings.sandbox_pids, settings.max_sandbox_pids),
        network=network,
    )


def docker_host_limits(resources: SandboxResources, engine_cpus: int) -> dict[str, Any]:
    """Keyword arguments of `create_host_config`; swap is off (memswap = memory)."""
    memory = f"{resources.memory_mb}m"
    return {
        # Docker refuses more CPUs than the engine's machine has.
        "nano_cpus": int(min(resources.cpus, engine_cpus) * 1e9),
        "mem_limit": memory,
        "memswap_limit": memory,
        "pids_limit": resources.pids,
        "network_mode": str(resources.network),
    }


def parse_labels(text: str) -> dict[str, str]:
    """`key=value,key=value` (the `sandbox_labels` setting) as a dict."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels
