"""Sandboxes for the backend contract tests: every test using `sandbox` runs on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from taskbus.contracts.specs import Resources
from taskbus.runtime_runner.local import LocalLimits, LocalSandbox
from taskbus.runtime_runner.sandbox import Sandbox
from taskbus.runtime_runner.shell import ShellLimits

# The docker backend joins this list when it lands.
BACKENDS = ["local"]

TEST_LIMITS = ShellLimits(
    no_change_seconds=1.0,
    command_seconds=5.0,
    max_output_bytes=8 * 1024,
    max_streamed_bytes=64 * 1024,
)

SandboxMaker = Callable[..., Awaitable[Sandbox]]


@pytest.fixture(params=BACKENDS)
async def make_sandbox(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SandboxMaker]:
    """Starts sandboxes of one backend (with an optional repository) and closes them after."""
    started: list[Sandbox] = []

    async def make(
        repository: str | None = None, branch: str | None = None, conversation_id: str = "c1"
    ) -> Sandbox:
        assert request.param == "local"
        sandbox = LocalSandbox(
            conversation_id,
            tmp_path / "workspaces",
            TEST_LIMITS,
            LocalLimits(max_file_bytes=100 * 1024 * 1024, resources=Resources()),
            clone_seconds=60,
        )
        started.append(sandbox)
        await sandbox.start(repository, branch)
        return sandbox

    yield make
    for sandbox in started:
        await sandbox.close()


@pytest.fixture
async def sandbox(make_sandbox: SandboxMaker) -> Sandbox:
    return await make_sandbox()
