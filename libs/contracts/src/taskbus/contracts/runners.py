"""What a runtime-runner tells the others about itself (KV `taskbus_runners`, key = runner id).

The gateway's /api/health and the launcher's banner read it, so the isolation in use is never a
guess: a runner that runs sandboxes unsandboxed says so here.
"""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec


class SandboxIsolation(enum.StrEnum):
    GVISOR = "gvisor"  # docker with the runsc runtime
    DOCKER_HARDENED = "docker-hardened"  # docker with runc: unprivileged, cap_drop=ALL, ro root
    BUBBLEWRAP = "bubblewrap"  # local backend under bwrap namespaces
    NONE = "none"  # local backend unsandboxed: a single-user loopback stack, or operator opt-in


class RunnerInfo(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: str
    host: str
    backend: str  # "docker" | "local"
    isolation: SandboxIsolation
    # Set when isolation is NONE: why it runs so and the one line that fixes it.
    warning: str | None = None
    started_at: datetime


def encode_runner_info(info: RunnerInfo) -> bytes:
    return msgspec.json.encode(info)


def decode_runner_info(data: bytes) -> RunnerInfo:
    return msgspec.json.decode(data, type=RunnerInfo)
