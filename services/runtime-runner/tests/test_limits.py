"""Pure: sandbox resources from request, defaults and maxima; Docker's stream frames; labels."""

from __future__ import annotations

import pytest

from taskbus.contracts.specs import NetworkMode, Resources
from taskbus.runtime_runner.docker_frames import FrameDecoder
from taskbus.runtime_runner.limits import (
    SandboxResources,
    docker_host_limits,
    effective_resources,
    parse_labels,
)
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

SETTINGS = RuntimeRunnerSettings(
    sandbox_cpus=1,
    max_sandbox_cpus=2,
    sandbox_memory_mb=1024,
    max_sandbox_memory_mb=2048,
    sandbox_pids=100,
    max_sandbox_pids=200,
    sandbox_network=NetworkMode.BRIDGE,
)


def test_defaults_fill_what_the_conversation_did_not_ask_for() -> None:
    assert effective_resources(Resources(), SETTINGS) == SandboxResources(
        cpus=1, memory_mb=1024, pids=100, network=NetworkMode.BRIDGE
    )


def test_requests_are_kept_below_the_maxima_and_capped_above() -> None:
    small = Resources(cpus=0.5, memory_mb=64, pids=16, network=NetworkMode.NONE)
    assert effective_resources(small, SETTINGS) == SandboxResources(
        cpus=0.5, memory_mb=64, pids=16, network=NetworkMode.NONE
    )
    huge = Resources(cpus=64, memory_mb=100_000, pids=100_000)
    assert effective_resources(huge, SETTINGS) == SandboxResources(
        cpus=2, memory_mb=2048, pids=200, network=NetworkMode.BRIDGE
    )


def test_an_operator_without_network_forces_none() -> None:
    settings = RuntimeRunnerSettings(sandbox_network_allowed=False)
    asked = Resources(network=NetworkMode.BRIDGE)
    assert effective_resources(asked, settings).network == NetworkMode.NONE


def test_docker_limits_disable_swap_and_respect_the_engine_cpus() -> None:
    resources = SandboxResources(cpus=4, memory_mb=300, pids=50, network=NetworkMode.NONE)
    assert docker_host_limits(resources, engine_cpus=2) == {
        "nano_cpus": 2_000_000_000,
        "mem_limit": "300m",
        "memswap_limit": "300m",
        "pids_limit": 50,
        "network_mode": "none",
    }


def test_labels_setting() -> None:
    assert parse_labels("") == {}
    assert parse_labels("a=1, team = x ,empty=") == {"a": "1", "team": "x", "empty": ""}
    with pytest.raises(ValueError, match="key=value"):
        parse_labels("novalue")


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def test_frames_are_joined_across_reads_and_streams() -> None:
    data = frame(1, b"hello ") + frame(2, b"err ") + frame(1, b"world")
    decoder = FrameDecoder()
    out = b"".join(decoder.feed(data[i : i + 3]) for i in range(0, len(data), 3))
    assert out == b"hello err world"
    assert decoder.feed(frame(1, b"")) == b""
    assert decoder.feed(frame(1, b"x")[:5]) == b""  # a partial header waits
