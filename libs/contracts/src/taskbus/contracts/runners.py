"""What a runtime-runner tells the others about itself (KV `taskbus_runners`, key = runner id).

The gateway's /api/health and the launcher's banner read it, so the isolation in use is never a
guess: a runner that runs sandboxes unsandboxed says so here. The runner puts it again every
`HEARTBEAT_SECONDS` with its live sandbox count: session-manager places new sandboxes on runners
with room, and a runner whose entry stops changing for its `runner_lost_seconds` is lost.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

import msgspec

HEARTBEAT_SECONDS = 2.0

# A runner id is a subject token: its work subject and durable carry it.
RunnerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class SandboxIsolation(enum.StrEnum):
    GVISOR = "gvisor"  # docker with the runsc runtime
    DOCKER_HARDENED = "docker-hardened"  # docker with runc: unprivileged, cap_drop=ALL, ro root
    BUBBLEWRAP = "bubblewrap"  # local backend under bwrap namespaces
    NONE = "none"  # local backend unsandboxed: a single-user loopback stack, or operator opt-in


class RunnerInfo(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: RunnerId
    host: str
    backend: str  # "docker" | "local"
    isolation: SandboxIsolation
    # Set when isolation is NONE: why it runs so and the one line that fixes it.
    warning: str | None = None
    started_at: datetime
    # Sandboxes it takes, and how many it holds now (as of this heartbeat).
    slots: int = 16
    sandboxes: int = 0
    # The host's memory, for operators comparing runners.
    memory_mb: int = 0


def encode_runner_info(info: RunnerInfo) -> bytes:
    return msgspec.json.encode(info)


def decode_runner_info(data: bytes) -> RunnerInfo:
    return msgspec.json.decode(data, type=RunnerInfo)
