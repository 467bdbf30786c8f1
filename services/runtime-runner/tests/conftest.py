"""Sandboxes for the backend contract tests: every test using `sandbox` runs on every backend.

Docker tests use the real engine, through testcontainers. The sandbox image is built (never
pulled) when missing, and every container this test session creates carries a
`taskbus.test_run` label, so the session removes them all at the end whatever happened (and a
crashed session's leftovers are recognisable). Ryuk, testcontainers' reaper, would need an
image from a registry: it is off, and that label-based cleanup does its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import docker
import docker.errors
import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.docker_client import DockerClient

from taskbus.contracts import subjects
from taskbus.contracts.events import decode_event
from taskbus.contracts.runner_work import RUNNER_EVENTS, forward
from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.backend import sandbox_user
from taskbus.runtime_runner.docker_sandbox import DockerEngine, DockerSandbox, DockerSandboxConfig
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.local import LocalConfinement, LocalSandbox
from taskbus.runtime_runner.sandbox import Sandbox
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.runtime_runner.shell import ShellLimits

BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]
SANDBOX_IMAGE = "taskbus-sandbox:latest"
BUILD_SCRIPT = Path(__file__).parents[3] / "deploy" / "sandbox-image" / "build.sh"
TEST_RUN_LABEL = "taskbus.test_run"
TEST_RUN = uuid.uuid4().hex[:12]

TEST_LIMITS = ShellLimits(
    no_change_seconds=1.0,
    command_seconds=5.0,
    max_output_bytes=8 * 1024,
    max_streamed_bytes=64 * 1024,
)
TEST_RESOURCES = SandboxResources(cpus=1, memory_mb=512, pids=256, network=NetworkMode.NONE)

SandboxMaker = Callable[..., Awaitable[Sandbox]]

testcontainers_config.ryuk_disabled = True


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.APIClient]:
    """The real engine with the sandbox image; removes this session's containers at the end."""
    try:
        client = DockerClient().client.api  # the engine testcontainers finds (env, context)
        client.ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine answers: {error}")
    # Builds the image when missing or made by an older build.sh; quick when up to date.
    subprocess.run([str(BUILD_SCRIPT), SANDBOX_IMAGE], check=True, timeout=600)
    yield client
    for container in client.containers(all=True, filters={"label": run_label_filter()}):
        client.remove_container(container["Id"], force=True)
    client.close()


def run_label_filter() -> str:
    return f"{TEST_RUN_LABEL}={TEST_RUN}"


def sandbox_image_container(**options: object) -> DockerContainer:
    """A bare container of the sandbox image (its own user and entrypoint, none of the
    runner's hardening), labelled for this session's cleanup; `options` are docker's."""
    return DockerContainer(
        SANDBOX_IMAGE, command="sleep infinity", labels={TEST_RUN_LABEL: TEST_RUN}, **options
    )


@pytest.fixture(scope="session")
def docker_engine(docker_client: docker.APIClient) -> Iterator[DockerEngine]:
    engine = DockerEngine(docker.APIClient(max_pool_size=32), cpus=docker_client.info()["NCPU"])
    yield engine
    engine.close()


@pytest.fixture
def docker_config(docker_engine: DockerEngine) -> DockerSandboxConfig:
    return DockerSandboxConfig(
        docker_engine,
        SANDBOX_IMAGE,
        "test",
        {TEST_RUN_LABEL: TEST_RUN},
        user=sandbox_user(RuntimeRunnerSettings()),
    )


def local_confinement(resources: SandboxResources = TEST_RESOURCES) -> LocalConfinement:
    """The runner's own: under bubblewrap, as the unprivileged sandbox user when root."""
    return LocalConfinement(
        bubblewrap=True,
        user=sandbox_user(RuntimeRunnerSettings()),
        resources=resources,
        max_file_bytes=100 * 1024 * 1024,
    )


@pytest.fixture(params=BACKENDS)
async def make_sandbox(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SandboxMaker]:
    """Starts sandboxes of one backend (with an optional repository) and closes them after."""
    started: list[Sandbox] = []
    docker_config = request.getfixturevalue("docker_config") if request.param == "docker" else None

    async def make(
        repository: str | None = None,
        branch: str | None = None,
        resources: SandboxResources = TEST_RESOURCES,
    ) -> Sandbox:
        conversation_id = uuid.uuid4().hex
        sandbox: Sandbox
        if docker_config is not None:
            sandbox = DockerSandbox(
                docker_config,
                conversation_id,
                "u1",
                tmp_path / "workspaces",
                resources,
                TEST_LIMITS,
                clone_seconds=60,
            )
        else:
            sandbox = LocalSandbox(
                conversation_id,
                tmp_path / "workspaces",
                TEST_LIMITS,
                local_confinement(resources),
                clone_seconds=60,
            )
        started.append(sandbox)
        await sandbox.start(repository, branch)
        return sandbox

    yield make
    await asyncio.gather(*(sandbox.close() for sandbox in started))


@pytest.fixture
async def sandbox(make_sandbox: SandboxMaker) -> Sandbox:
    return await make_sandbox()


class RunnerProcess:
    """`python -m taskbus.runtime_runner` as a real process, its log kept in a file."""

    def __init__(self, environment: dict[str, str], log: Path) -> None:
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "taskbus.runtime_runner"],
            env={**os.environ, **environment},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)
        self.process.wait(20)
        self._log.close()


@pytest.fixture
def runner_processes() -> Iterator[list[RunnerProcess]]:
    """Runner processes a test starts; those still running at its end are killed."""
    processes: list[RunnerProcess] = []
    yield processes
    for runner in processes:
        if runner.process.poll() is None:
            runner.kill(signal.SIGKILL)


async def until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    """Poll `condition` instead of sleeping a guessed time, which a slower machine outlasts."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never true within {seconds} s: {what}")


@asynccontextmanager
async def forwarding(js: JetStreamContext, runner_id: str) -> AsyncIterator[None]:
    """Session-manager's part, for tests that run a runner without one: every event appended
    from now on that a runner acts on goes to `runner_id`'s work subject, through the same
    `runner_work.forward` session-manager uses."""

    async def forward_one(msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except msgspec.MsgspecError:
            return  # session-manager would refuse it too: no runner hears of it
        if isinstance(event, RUNNER_EVENTS):
            await forward(js, runner_id, event, msg)

    sub = await js.subscribe(
        subjects.ALL_EVENTS, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=forward_one
    )
    try:
        yield
    finally:
        await sub.unsubscribe()


CONSUMER_WAIT_SECONDS = 60.0


def fresh_runner_id() -> str:
    """A runner of its own per test: its durable and work subject skip the other tests'."""
    return f"test-{uuid.uuid4().hex[:12]}"


async def wait_for_runner_consumer(js: JetStreamContext, runner_id: str) -> None:
    """Until the runner's durable exists: work forwarded before it is kept for it anyway."""
    name = subjects.runtime_runner_durable(runner_id)
    # A (re)started runner process imports, re-attaches and registers first: on a loaded
    # two-core machine that took longer than 10 s.
    deadline = time.monotonic() + CONSUMER_WAIT_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError):
            await js.consumer_info(subjects.RUNNER_WORK_STREAM, name)
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"consumer {name} never appeared")
