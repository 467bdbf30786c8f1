"""Runtime-runner configuration from `TASKBUS_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=1024)]


class RuntimeRunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # "auto" picks the best available backend; until the docker backend lands that is "local".
    backend: Literal["auto", "local"] = "auto"
    workspace_root: str = "./.taskbus/workspaces"
    # Defaults for conversations whose RuntimeRequested does not set its own timeouts.
    no_change_seconds: Seconds = 10.0
    command_seconds: Seconds = 120.0
    clone_seconds: Seconds = 300.0
    # Cap of one observation's output (head and tail are kept, the middle is dropped).
    max_output_bytes: Bytes = 64 * 1024
    # Cap of one command's live CmdOutputChunk stream, so a chatty command cannot flood the log.
    max_streamed_bytes: Bytes = 1024 * 1024
    # RLIMIT_FSIZE of sandboxed processes on the local backend.
    max_file_bytes: Bytes = 1024 * 1024 * 1024
    consumer_name: str = "runtime_runner"
    # "start" replays the whole log on first start (start order does not matter); "new" skips it.
    consume_from: Literal["start", "new"] = "start"
    ack_wait_seconds: Seconds = 30.0
    max_ack_pending: Annotated[int, msgspec.Meta(ge=1)] = 512
