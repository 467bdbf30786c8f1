"""Which isolation a runner picks, that it refuses to run unsandboxed unless allowed, and that
it tells the others what it picked (the runners bucket)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.runners import HEARTBEAT_SECONDS, SandboxIsolation, decode_runner_info
from taskbus.runtime_runner.app import RuntimeRunnerService
from taskbus.runtime_runner.backend import SandboxUnavailable, choose_backend
from taskbus.runtime_runner.settings import RuntimeRunnerSettings


@pytest.fixture
def no_bwrap_path(tmp_path: Path) -> str:
    """A PATH on which bwrap cannot be found (nothing else the check needs is on PATH)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return str(empty)


def test_local_without_bwrap_refuses_to_start_with_one_line_saying_what_to_do(
    no_bwrap_path: str, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "taskbus.runtime_runner"],
        env={
            **os.environ,
            "PATH": no_bwrap_path,
            "TASKBUS_BACKEND": "local",
            "TASKBUS_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "TASKBUS_NATS_URL": "nats://127.0.0.1:1",  # never reached: it refuses first
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "apt-get install bubblewrap" in lines[0]
    assert "TASKBUS_ALLOW_UNSANDBOXED=1" in lines[0]


async def test_without_bwrap_the_operator_may_allow_unsandboxed_and_is_warned(
    no_bwrap_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", no_bwrap_path)
    with pytest.raises(SandboxUnavailable):
        await choose_backend(RuntimeRunnerSettings(backend="local"))
    backend = await choose_backend(RuntimeRunnerSettings(backend="local", allow_unsandboxed=True))
    assert backend.isolation == SandboxIsolation.NONE
    assert backend.warning is not None and "apt-get install bubblewrap" in backend.warning


async def test_local_with_bwrap_is_bubblewrap_isolation() -> None:
    backend = await choose_backend(RuntimeRunnerSettings(backend="local"))
    assert (backend.name, backend.isolation, backend.warning) == (
        "local",
        SandboxIsolation.BUBBLEWRAP,
        None,
    )


async def test_a_docker_runtime_the_engine_lacks_refuses_to_start() -> None:
    try:
        await choose_backend(RuntimeRunnerSettings(backend="docker", docker_runtime="nope"))
    except SandboxUnavailable as refusal:
        assert "nope" in str(refusal)
    else:
        raise AssertionError("a runner with an unknown docker runtime started")


async def test_the_runner_registers_its_isolation_and_capacity_and_keeps_beating(
    nats_url: str, js: JetStreamContext, tmp_path: Path
) -> None:
    runner_id = f"isolation-{uuid.uuid4().hex[:8]}"
    settings = RuntimeRunnerSettings(
        nats_url=nats_url,
        backend="local",
        runner_id=runner_id,
        workspace_root=str(tmp_path / "workspaces"),
        runner_slots=3,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(RuntimeRunnerService(settings).run(stop))
    bucket = await js.key_value(subjects.RUNNERS_BUCKET)
    try:
        for _ in range(200):
            try:
                entry = await bucket.get(runner_id)
                break
            except Exception:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the runner never published its RunnerInfo")
        assert entry.value is not None
        info = decode_runner_info(entry.value)
        assert (info.runner_id, info.backend, info.isolation) == (
            runner_id,
            "local",
            SandboxIsolation.BUBBLEWRAP,
        )
        assert msgspec.json.decode(entry.value)["isolation"] == "bubblewrap"
        assert (info.slots, info.sandboxes) == (3, 0) and info.memory_mb > 0
        # The heartbeat: the entry is put again (a new revision) every HEARTBEAT_SECONDS.
        await asyncio.sleep(HEARTBEAT_SECONDS * 1.5)
        assert (await bucket.get(runner_id)).revision != entry.revision
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await js.delete_consumer(
            subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(runner_id)
        )
