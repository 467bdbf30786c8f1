"""Runtime-runner configuration from `TASKBUS_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from taskbus.contracts.runners import RunnerId
from taskbus.contracts.specs import NetworkMode

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=1024)]


class RuntimeRunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # Prometheus `/metrics` on this port (0: any free one, named in /api/health); unset: none.
    # Unauthenticated: keep the host where only the scraper reaches.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Replicas of the streams and KV buckets, if this service is the first to create them
    # (3 on a 3-node NATS cluster); existing ones keep what they have.
    stream_replicas: int = 1
    # "auto" is docker when an engine answers and has the sandbox image, else local under
    # bubblewrap, else local unsandboxed if `allow_unsandboxed`.
    backend: Literal["auto", "local", "docker"] = "auto"
    sandbox_image: str = "taskbus-sandbox:latest"
    # The OCI runtime of docker sandboxes: "runc", or "runsc" for gVisor (registered in dockerd).
    docker_runtime: str = "runc"
    # Lets the local backend run sandboxes without bubblewrap, unisolated (development on a
    # single-user machine only); without it, a local backend lacking bwrap refuses to start.
    allow_unsandboxed: bool = False
    # The user sandboxed processes run as when the runner is root (the sandbox image's
    # `taskbus`); a runner that is not root runs them as itself.
    sandbox_uid: Annotated[int, msgspec.Meta(ge=1)] = 1000
    sandbox_gid: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Unique per runner and kept across restarts: its work subject and durable
    # (`taskbus.runner.<id>.>`) carry it, conversations are placed on it by it, and reconciliation
    # at start-up only touches containers labelled with it. Letters, digits, _ and -.
    runner_id: RunnerId = "default"
    # On SIGTERM docker sandboxes are kept for the next runner to re-attach; True removes them.
    remove_sandboxes_on_shutdown: bool = False
    # Extra container labels, "key=value,key=value" (tests mark their containers with one).
    sandbox_labels: str = ""
    # Sandbox resources when the conversation asks for none, and the most it may ask for.
    sandbox_cpus: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_sandbox_cpus: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    sandbox_memory_mb: Annotated[int, msgspec.Meta(ge=16)] = 2048
    max_sandbox_memory_mb: Annotated[int, msgspec.Meta(ge=16)] = 8192
    sandbox_pids: Annotated[int, msgspec.Meta(ge=8)] = 512
    max_sandbox_pids: Annotated[int, msgspec.Meta(ge=8)] = 4096
    sandbox_network: NetworkMode = NetworkMode.BRIDGE
    # False forces network "none" whatever a conversation asks for.
    sandbox_network_allowed: bool = True
    workspace_root: str = "./.taskbus/workspaces"
    # The key that opens users' sealed secrets (contracts/secret_box.py): git provider tokens,
    # sandbox secrets and MCP server secrets. The key itself, or a file holding it (`taskbus up`
    # writes <data dir>/secrets.key).
    secrets_key: str | None = None
    secrets_key_file: str | None = None
    # A host directory of Python packages local sandboxes see read-only at /opt/taskbus/python,
    # on their PYTHONPATH: what MCP servers written with the mcp SDK need (`uv pip install
    # --target DIR --python /usr/bin/python3 mcp`; readable by the sandbox user). The docker
    # image has it built in (deploy/sandbox-image/build.sh).
    sandbox_toolbox: str | None = None
    # How long a conversation's MCP servers may take to start and list their tools, and one
    # tool call to answer (a remote server's own `timeout` replaces the latter).
    mcp_start_seconds: Seconds = 30.0
    mcp_call_seconds: Seconds = 120.0
    # Defaults for conversations whose RuntimeRequested does not set its own timeouts.
    no_change_seconds: Seconds = 10.0
    command_seconds: Seconds = 120.0
    clone_seconds: Seconds = 300.0
    # How often each live, unpaused sandbox's use of the host becomes a `ResourceUsage` event.
    usage_interval_seconds: Seconds = 5.0
    # Cap of one observation's output (head and tail are kept, the middle is dropped).
    max_output_bytes: Bytes = 64 * 1024
    # Cap of one command's live CmdOutputChunk stream, so a chatty command cannot flood the log.
    max_streamed_bytes: Bytes = 1024 * 1024
    # RLIMIT_FSIZE of sandboxed processes on the local backend.
    max_file_bytes: Bytes = 1024 * 1024 * 1024
    # Sandboxes session-manager places on this runner before it counts as full.
    runner_slots: Annotated[int, msgspec.Meta(ge=1)] = 16
    # Docker containers kept started for new conversations (pool.py), made with the default
    # sandbox resources; 0: every sandbox starts cold (as under gVisor, see app.warm_pool).
    runner_warm_pool: Annotated[int, msgspec.Meta(ge=0)] = 0
    # The most conversations' sandboxes (containers on docker) this runner holds at once; a
    # start beyond it waits `sandbox_wait_seconds` for one to be given back, then fails with
    # `runner_full`. The warm pool fills only while held and warm ones together are below it,
    # so containers never exceed it by more than `runner_warm_pool`. None (the default): no
    # bound. It counts finished conversations' sandboxes until they are given back
    # (`sandbox_release_seconds`, 60 s) while session-manager places by `runner_slots`, which
    # frees at FINISHED: a bound near `runner_slots` fails a busy runner's new work with
    # `runner_full` (a 200-conversation wave did, at 32), so set it well above.
    runner_max_sandboxes: Annotated[int, msgspec.Meta(ge=1)] | None = None
    sandbox_wait_seconds: Seconds = 30.0
    ack_wait_seconds: Seconds = 30.0
    max_ack_pending: Annotated[int, msgspec.Meta(ge=1)] = 512
    # Deliveries of one event before the runner gives up on it (it is logged and kept as a dead
    # letter): an event no retry can handle is not retried forever.
    max_deliver: Annotated[int, msgspec.Meta(ge=1)] = 20
