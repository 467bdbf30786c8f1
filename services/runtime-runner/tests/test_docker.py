"""The docker backend on the real engine: limits as requested, a fork bomb held, no network;
and the sandbox image itself, in testcontainers: git, a non-root user, the mcp SDK."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_CONVERSATION,
    LABEL_MANAGED,
    LABEL_USER,
    DockerSandbox,
    DockerSandboxConfig,
)
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.sandbox import CommandOutcome, CommandRequest

from .conftest import TEST_LIMITS, TEST_RESOURCES, sandbox_image_container

pytestmark = pytest.mark.docker


async def ignore(_: str) -> None:
    pass


async def run(sandbox: DockerSandbox, command: str, **options: object) -> CommandOutcome:
    return await sandbox.run_command(CommandRequest(command=command, **options), ignore)  # type: ignore[arg-type]


@pytest.fixture
async def started() -> AsyncIterator[list[DockerSandbox]]:
    sandboxes: list[DockerSandbox] = []
    yield sandboxes
    for sandbox in sandboxes:
        await sandbox.close()


async def start(
    config: DockerSandboxConfig,
    root: Path,
    started: list[DockerSandbox],
    resources: SandboxResources = TEST_RESOURCES,
) -> DockerSandbox:
    sandbox = DockerSandbox(
        config, uuid.uuid4().hex, "user-7", root, resources, TEST_LIMITS, clone_seconds=60
    )
    started.append(sandbox)
    await sandbox.start(None, None)
    return sandbox


async def test_container_has_the_requested_limits_labels_and_workspace(
    docker_config: DockerSandboxConfig,
    docker_client: docker.APIClient,
    tmp_path: Path,
    started: list[DockerSandbox],
) -> None:
    resources = SandboxResources(cpus=0.5, memory_mb=300, pids=100, network=NetworkMode.NONE)
    sandbox = await start(docker_config, tmp_path, started, resources)
    info = docker_client.inspect_container(sandbox.sandbox_id)
    host = info["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 300 * 1024 * 1024
    assert host["PidsLimit"] == 100
    assert host["NetworkMode"] == "none"
    assert host["Init"] is True
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_USER] == "user-7"
    assert sandbox.sandbox_id.endswith(labels[LABEL_CONVERSATION])
    # The limits as the sandbox itself sees them (cgroup v1 or v2).
    seen = await run(
        sandbox,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max; "
        "cat /sys/fs/cgroup/memory.max 2>/dev/null "
        "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes; pwd",
    )
    assert seen.content.split() == ["100", str(300 * 1024 * 1024), "/workspace"]
    # The workspace is the bind-mounted host directory.
    await run(sandbox, "echo from-inside > made-in-container.txt")
    assert await sandbox.read_bytes("made-in-container.txt") == b"from-inside\n"


async def test_a_fork_bomb_is_held_by_the_pids_limit(
    docker_config: DockerSandboxConfig,
    docker_client: docker.APIClient,
    tmp_path: Path,
    started: list[DockerSandbox],
) -> None:
    resources = SandboxResources(cpus=1, memory_mb=512, pids=64, network=NetworkMode.NONE)
    bombed = await start(docker_config, tmp_path, started, resources)
    neighbour = await start(docker_config, tmp_path, started)
    # Every level waits for its pipeline, so the bomb keeps forking against the limit until
    # `timeout` kills its whole process group after 4 s; a backgrounded bomb would let the
    # command end before the fork errors are printed.
    bomb = await run(
        bombed, "timeout -s KILL 4 bash -c 'bomb() { bomb | bomb; }; bomb'", blocking=True
    )
    assert bomb.exit_code == 137, bomb
    assert "Resource temporarily unavailable" in bomb.content
    assert (await run(neighbour, "echo neighbour fine")).content.strip() == "neighbour fine"
    assert docker_client.inspect_container(bombed.sandbox_id)["State"]["Running"]
    # Bomb processes stuck in bash's fork retry may still be printing; the shell answers anyway.
    survived = await run(bombed, "echo survived")
    assert survived.exit_code == 0 and "survived" in survived.content.splitlines()


async def test_network_none_has_only_loopback_and_bridge_has_more(
    docker_config: DockerSandboxConfig, tmp_path: Path, started: list[DockerSandbox]
) -> None:
    isolated = await start(docker_config, tmp_path, started)
    assert TEST_RESOURCES.network == NetworkMode.NONE
    assert (await run(isolated, "ls /sys/class/net")).content.split() == ["lo"]
    refused = await run(
        isolated,
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\"",
    )
    assert refused.exit_code != 0 and "Network is unreachable" in refused.content
    bridged = await start(
        docker_config,
        tmp_path,
        started,
        SandboxResources(cpus=1, memory_mb=256, pids=64, network=NetworkMode.BRIDGE),
    )
    assert "eth0" in (await run(bridged, "ls /sys/class/net")).content.split()


async def test_pause_freezes_the_container_and_resume_continues(
    docker_config: DockerSandboxConfig,
    docker_client: docker.APIClient,
    tmp_path: Path,
    started: list[DockerSandbox],
) -> None:
    sandbox = await start(docker_config, tmp_path, started)
    await sandbox.pause()
    assert docker_client.inspect_container(sandbox.sandbox_id)["State"]["Paused"]
    await sandbox.resume()
    assert (await run(sandbox, "echo thawed")).content.strip() == "thawed"


async def test_close_removes_the_container_and_keeps_the_files(
    docker_config: DockerSandboxConfig,
    docker_client: docker.APIClient,
    tmp_path: Path,
    started: list[DockerSandbox],
) -> None:
    sandbox = await start(docker_config, tmp_path, started)
    await sandbox.write_bytes("kept.txt", b"kept")
    await sandbox.close()
    assert not docker_client.containers(all=True, filters={"name": sandbox.sandbox_id})
    assert (tmp_path / sandbox.sandbox_id.removeprefix("taskbus-") / "kept.txt").read_bytes() == (
        b"kept"
    )


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_sandbox_image_runs_as_a_user_with_git_and_the_mcp_sdk(
    docker_client: docker.APIClient, runtime: str
) -> None:
    with sandbox_image_container(runtime=runtime) as container:
        assert container.exec(["id", "-un"]).output.decode().strip() == "taskbus"
        assert container.exec(["id", "-u"]).output.decode().strip() != "0"
        git = container.exec(["git", "--version"])
        assert git.exit_code == 0 and git.output.startswith(b"git version"), git
        # MCP servers written with the SDK run with the image's python3 as they are.
        mcp = container.exec(["python3", "-c", "import mcp; print(mcp.__file__)"])
        assert mcp.output.decode().startswith("/opt/taskbus/python/mcp/"), mcp
        interfaces = (
            container.exec(
                ["python3", "-c", "import socket; print(*(n for _, n in socket.if_nameindex()))"]
            )
            .output.decode()
            .split()
        )
        # Docker gives it a bridge; gVisor (runsc, --network=none here) leaves only loopback.
        expected = ["lo"] if runtime == "runsc" else ["lo", "eth0"]
        assert sorted(interfaces) == sorted(expected), interfaces
