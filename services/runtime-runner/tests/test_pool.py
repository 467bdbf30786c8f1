"""The warm pool on the real engine: a new conversation's sandbox is a warm container made its
own (its workspace, its name, the clone after hand-over), the pool refills, and no conversation
ever sees another's files or a container another one used."""

from __future__ import annotations

import asyncio
import math
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from taskbus.contracts.runners import SandboxIsolation
from taskbus.runtime_runner.app import warm_pool
from taskbus.runtime_runner.backend import Backend
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_WARM,
    WARM_NAME_PREFIX,
    DockerSandbox,
    DockerSandboxConfig,
    container_name,
)
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.pool import WarmPool
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

from .conftest import TEST_LIMITS, TEST_RESOURCES, run_label_filter
from .test_docker import run

pytestmark = pytest.mark.docker


@pytest.fixture
async def pool(docker_config: DockerSandboxConfig, tmp_path: Path) -> AsyncIterator[WarmPool]:
    """A pool of two for `docker_config`'s sandboxes, full before the test starts."""
    warm = WarmPool(docker_config, tmp_path / "workspaces", 2, TEST_RESOURCES, lambda: math.inf)
    docker_config.warm = warm
    await warm.start()
    await asyncio.wait_for(warm.filled(), 60)
    yield warm
    await warm.close()


# Resources no warm container was made with.
_OTHER = SandboxResources(cpus=1, memory_mb=256, pids=128, network=TEST_RESOURCES.network)


@pytest.fixture
async def sandboxes() -> AsyncIterator[list[DockerSandbox]]:
    started: list[DockerSandbox] = []
    yield started
    for sandbox in started:
        await sandbox.close()


def new_sandbox(
    config: DockerSandboxConfig,
    root: Path,
    started: list[DockerSandbox],
    conversation_id: str | None = None,
    resources: SandboxResources = TEST_RESOURCES,
) -> DockerSandbox:
    sandbox = DockerSandbox(
        config,
        conversation_id or uuid.uuid4().hex,
        "u1",
        root,
        resources,
        TEST_LIMITS,
        clone_seconds=60,
    )
    started.append(sandbox)
    return sandbox


def warm_names(client: docker.APIClient) -> set[str]:
    """The running containers still in the pool (handed-over ones keep the label, not the
    name)."""
    listed = client.containers(filters={"label": [run_label_filter(), f"{LABEL_WARM}=true"]})
    names = {str(c["Names"][0]).lstrip("/") for c in listed}
    return {name for name in names if name.startswith(WARM_NAME_PREFIX)}


def workspace_source(client: docker.APIClient, name: str) -> str:
    (mount,) = [
        m for m in client.inspect_container(name)["Mounts"] if m["Destination"] == "/workspace"
    ]
    return str(mount["Source"])


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(origin)], check=True)
    (origin / "README.md").write_text("from the repository\n")
    git = ["git", "-C", str(origin), "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    return origin


def is_empty(directory: Path) -> bool:
    return not any(directory.iterdir())


async def test_a_new_conversation_takes_a_warm_container_and_clones_after_hand_over(
    origin: Path,
    docker_config: DockerSandboxConfig,
    pool: WarmPool,
    tmp_path: Path,
    sandboxes: list[DockerSandbox],
    docker_client: docker.APIClient,
) -> None:
    warm_before = warm_names(docker_client)
    root = tmp_path / "workspaces"
    sandbox = new_sandbox(docker_config, root, sandboxes)
    await sandbox.start(str(origin), None)
    name = container_name(sandbox._conversation_id)
    assert len(warm_before - warm_names(docker_client)) == 1  # one of the pool's, renamed
    assert docker_client.inspect_container(name)["State"]["Running"]
    # Bound to the conversation's own workspace, where the runner's file actions look.
    assert (await run(sandbox, "cat README.md && echo made > made.txt")).content.startswith(
        "from the repository"
    )
    assert (root / sandbox._conversation_id / "made.txt").read_text() == "made\n"
    assert (root / sandbox._conversation_id / ".git").is_dir()
    # The pool starts a replacement in the background.
    await asyncio.wait_for(pool.filled(), 60)
    refilled = warm_names(docker_client)
    assert len(refilled) == 2 and len(refilled - warm_before) == 1


async def test_no_conversation_sees_another_ones_files_or_container(
    docker_config: DockerSandboxConfig,
    pool: WarmPool,
    tmp_path: Path,
    sandboxes: list[DockerSandbox],
    docker_client: docker.APIClient,
) -> None:
    """The attack: a conversation plants a secret and its pid, then looks for the other's from
    inside its own warm-started container, and the pool's next container is checked to bind a
    fresh empty directory, never a given-back one."""
    root = tmp_path / "workspaces"
    first = new_sandbox(docker_config, root, sandboxes)
    second = new_sandbox(docker_config, root, sandboxes)
    await first.start(None, None)
    await second.start(None, None)
    await run(first, "echo s3cret-of-first > secret.txt && sleep 300 &")
    look = await run(
        second,
        # The pattern split, so that the command's own text never matches.
        "ls -a /workspace; grep -rls 's3cret-of''-first' /workspace /tmp /home /run /mnt /opt /var;"
        " ps -eo args; grep workspace /proc/self/mountinfo",
        timeout=30,
    )
    assert "s3cret-of-first" not in look.content
    assert "secret.txt" not in look.content
    assert "sleep 300" not in look.content
    assert first._conversation_id not in look.content
    assert workspace_source(docker_client, first.sandbox_id) != workspace_source(
        docker_client, second.sandbox_id
    )
    # The first gives its container back: it is removed, never returned to the pool.
    await first.close()
    sandboxes.remove(first)
    assert first.sandbox_id not in {
        str(c["Names"][0]).lstrip("/") for c in docker_client.containers(all=True)
    }
    await asyncio.wait_for(pool.filled(), 60)
    for name in warm_names(docker_client):
        source = Path(workspace_source(docker_client, name))
        assert source.parent.name == docker_config.runner_id and is_empty(source)
    third = new_sandbox(docker_config, root, sandboxes)
    await third.start(None, None)
    assert "secret.txt" not in (await run(third, "ls -a /workspace")).content


async def test_a_kept_workspace_or_other_limits_start_cold_and_a_stopped_one_is_rebound(
    docker_config: DockerSandboxConfig,
    pool: WarmPool,
    tmp_path: Path,
    sandboxes: list[DockerSandbox],
    docker_client: docker.APIClient,
) -> None:
    root = tmp_path / "workspaces"
    given_back = new_sandbox(docker_config, root, sandboxes)
    await given_back.start(None, None)
    await run(given_back, "echo kept > kept.txt")
    await given_back.close()
    sandboxes.remove(given_back)
    await asyncio.wait_for(pool.filled(), 60)
    warm = warm_names(docker_client)
    # A later message's sandbox on the kept workspace: cold, bound to that workspace.
    again = new_sandbox(docker_config, root, sandboxes, given_back._conversation_id)
    await again.start(None, None)
    assert (await run(again, "cat kept.txt")).content.strip() == "kept"
    assert warm_names(docker_client) == warm
    assert workspace_source(docker_client, again.sandbox_id) == str(
        root.resolve() / again._conversation_id
    )
    # Limits no warm container has: cold too.
    other = new_sandbox(docker_config, root, sandboxes, resources=_OTHER)
    await other.start(None, None)
    assert warm_names(docker_client) == warm
    # A warm-started container stopped (a host reboot): re-attached, it binds the workspace,
    # not the pool directory it was made with (which docker would recreate empty).
    warm_started = new_sandbox(docker_config, root, sandboxes)
    await warm_started.start(None, None)
    await run(warm_started, "echo mine > mine.txt")
    docker_client.stop(warm_started.sandbox_id, timeout=0)
    await warm_started.shell.close()
    assert await warm_started.reattach() is False
    assert (await run(warm_started, "cat mine.txt")).content.strip().endswith("\nmine")
    assert WARM_NAME_PREFIX not in workspace_source(docker_client, warm_started.sandbox_id)


def test_gvisor_keeps_no_warm_pool(docker_config: DockerSandboxConfig) -> None:
    """Under runsc a renamed workspace directory fails stat and ls inside the container, so
    the operator's pool is not made there and every sandbox starts cold."""
    settings = RuntimeRunnerSettings(runner_warm_pool=2)
    assert warm_pool(settings, Backend(SandboxIsolation.GVISOR), docker_config, lambda: 1) is None
    assert docker_config.warm is None
    hardened = Backend(SandboxIsolation.DOCKER_HARDENED)
    made = warm_pool(settings, hardened, docker_config, lambda: 1)
    assert isinstance(made, WarmPool) and docker_config.warm is made


class _Secrets:
    """A conversation's sandbox secrets (credentials.ConversationSecrets)."""

    async def environment(self) -> dict[str, str]:
        return {"API_TOKEN": "t0ken-of-second"}


async def test_the_warm_shell_serves_only_a_conversation_without_secrets(
    docker_config: DockerSandboxConfig,
    pool: WarmPool,
    tmp_path: Path,
    sandboxes: list[DockerSandbox],
) -> None:
    """The pool's shell was started with no secret: a conversation that has some gets a shell
    of its own that exports them, and the pool's, cut off, exits; one with none keeps the
    pool's shell (containers of the pool start alike, so its pid is the same in each)."""
    root = tmp_path / "workspaces"
    shell_pid = "echo pid=$$"
    plain = new_sandbox(docker_config, root, sandboxes)
    await plain.start(None, None)
    assert (await run(plain, "echo ${API_TOKEN:-none}")).content.strip().endswith("none")
    pool_shell = (await run(plain, shell_pid)).content.split()[-1]
    with_secrets = new_sandbox(docker_config, root, sandboxes)
    with_secrets.secrets = _Secrets()  # type: ignore[assignment]
    await with_secrets.start(None, None)
    assert (await run(with_secrets, "echo $API_TOKEN")).content.strip().endswith("t0ken-of-second")
    assert (await run(with_secrets, shell_pid)).content.split()[-1] != pool_shell
    count = "pgrep -c -x bash"
    for _ in range(300):
        if (await run(with_secrets, count)).content.split()[-1] == "1":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the pool's cut-off shell is still running")
