"""The runner on the docker backend through real NATS: many conversations at once, and a
runner killed with SIGKILL mid-command, then restarted (real `python -m` processes)."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    CmdOutputObservation,
    ErrorObservation,
    EventSource,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeLost,
    RuntimeStatusChanged,
)
from taskbus.contracts.specs import NetworkMode, Resources
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.app import RuntimeRunnerService
from taskbus.runtime_runner.docker_sandbox import (
    LABEL_CONVERSATION,
    LABEL_MANAGED,
    LABEL_RUNNER,
    container_name,
)
from taskbus.runtime_runner.settings import RuntimeRunnerSettings

from .conftest import (
    SANDBOX_IMAGE,
    TEST_RUN,
    TEST_RUN_LABEL,
    RunnerProcess,
    forwarding,
    run_label_filter,
    until,
    wait_for_runner_consumer,
)
from .test_service import (
    command,
    read_log,
    reply_to,
    request_runtime,
    status,
    wait_for,
)

pytestmark = pytest.mark.docker


def runner_environment(nats_url: str, root: Path, runner_id: str) -> dict[str, str]:
    """Settings of a docker runner of its own: runner id (its durable) and workspace root."""
    return {
        "TASKBUS_NATS_URL": nats_url,
        "TASKBUS_BACKEND": "docker",
        "TASKBUS_SANDBOX_IMAGE": SANDBOX_IMAGE,
        "TASKBUS_RUNNER_ID": runner_id,
        "TASKBUS_SANDBOX_LABELS": f"{TEST_RUN_LABEL}={TEST_RUN}",
        "TASKBUS_WORKSPACE_ROOT": str(root),
        "TASKBUS_NO_CHANGE_SECONDS": "5",
        # Far longer than the test: a cut-off action must be answered without a redelivery.
        "TASKBUS_ACK_WAIT_SECONDS": "300",
    }


def containers_of(client: docker.APIClient, runner_id: str) -> list[dict[str, object]]:
    return list(
        client.containers(
            all=True, filters={"label": [run_label_filter(), f"{LABEL_RUNNER}={runner_id}"]}
        )
    )


@pytest.fixture
async def docker_service(
    nats_url: str, tmp_path: Path, js: JetStreamContext, docker_client: docker.APIClient
) -> AsyncIterator[str]:
    """An in-process docker runner; yields its runner id."""
    runner_id = uuid.uuid4().hex[:8]
    environment = runner_environment(nats_url, tmp_path, runner_id)
    settings = RuntimeRunnerSettings(
        nats_url=nats_url,
        backend="docker",
        runner_id=runner_id,
        sandbox_labels=environment["TASKBUS_SANDBOX_LABELS"],
        workspace_root=str(tmp_path),
    )
    stop = asyncio.Event()
    async with forwarding(js, runner_id):
        task = asyncio.create_task(RuntimeRunnerService(settings).run(stop))
        await wait_for_runner_consumer(js, runner_id)
        yield runner_id
        stop.set()
        await asyncio.wait_for(task, 20)
    await js.delete_consumer(
        subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(runner_id)
    )


async def test_ten_conversations_started_at_once_all_become_ready(
    js: JetStreamContext, docker_service: str, docker_client: docker.APIClient
) -> None:
    appender = EventAppender(js)
    cids = [uuid.uuid4().hex for _ in range(10)]
    resources = Resources(cpus=0.5, memory_mb=256, pids=128, network=NetworkMode.NONE)
    requests = await asyncio.gather(
        *(appender.append(request_runtime(cid, resources=resources)) for cid in cids)
    )
    readies = await asyncio.gather(
        *(
            wait_for(js, cid, status(requested, RuntimeStatus.READY), seconds=30)
            for cid, requested in zip(cids, requests, strict=True)
        )
    )
    assert all(isinstance(r, RuntimeStatusChanged) and r.backend == "docker" for r in readies)
    assert all(isinstance(r, RuntimeStatusChanged) and r.workspace == "/workspace" for r in readies)
    running = containers_of(docker_client, docker_service)
    labels = sorted(c["Labels"][LABEL_CONVERSATION] for c in running)  # type: ignore[index]
    assert labels == sorted(cids)
    assert all(c["State"] == "running" for c in running)
    # Each one's shell answers; then stopping removes every container.
    actions = await asyncio.gather(
        *(appender.append(command(cid, "echo $((6*7))")) for cid in cids)
    )
    for cid, action in zip(cids, actions, strict=True):
        answered = await wait_for(js, cid, reply_to(action, CmdOutputObservation))
        assert isinstance(answered, CmdOutputObservation) and answered.content.strip() == "42"
    stops = await asyncio.gather(
        *(
            appender.append(
                RuntimeControlRequested(
                    conversation_id=cid, source=EventSource.AGENT, action=RuntimeControl.STOP
                )
            )
            for cid in cids
        )
    )
    for cid, stop in zip(cids, stops, strict=True):
        await wait_for(js, cid, status(stop, RuntimeStatus.STOPPED))
    assert containers_of(docker_client, docker_service) == []


async def test_a_runner_killed_mid_command_restarts_reattached_without_orphans(
    js: JetStreamContext,
    nats_url: str,
    tmp_path: Path,
    docker_client: docker.APIClient,
    runner_processes: list[RunnerProcess],
) -> None:
    runner_id = uuid.uuid4().hex[:8]
    environment = runner_environment(nats_url, tmp_path / "workspaces", runner_id)
    async with forwarding(js, runner_id):
        log = tmp_path / "runner.log"
        runner_processes.append(RunnerProcess(environment, log))
        await wait_for_runner_consumer(js, runner_id)
        appender = EventAppender(js)
        cid = uuid.uuid4().hex
        requested = await appender.append(request_runtime(cid))
        await wait_for(js, cid, status(requested, RuntimeStatus.READY), seconds=20)
        prepared = await appender.append(command(cid, "echo kept > state.txt && cd /tmp"))
        await wait_for(js, cid, reply_to(prepared, CmdOutputObservation))
        (container,) = containers_of(docker_client, runner_id)
        # A second conversation, declared lost on this runner while it is down (as session-manager
        # does when a runner goes silent): the runner gives its sandbox back when it returns.
        moved_cid = uuid.uuid4().hex
        moved = await appender.append(request_runtime(moved_cid))
        await wait_for(js, moved_cid, status(moved, RuntimeStatus.READY), seconds=20)

        in_flight = await appender.append(command(cid, "sleep 61; echo never", blocking=True))
        await until(
            lambda: any(
                "sleep 61" in " ".join(process)
                for process in docker_client.top(container["Id"])["Processes"]
            ),
            "the command is running",
        )
        runner_processes[0].kill(signal.SIGKILL)
        assert docker_client.inspect_container(container["Id"])["State"]["Running"]
        # A container this runner owns whose conversation never got a live runtime: an orphan.
        orphan_cid = uuid.uuid4().hex
        orphan = docker_client.create_container(
            SANDBOX_IMAGE,
            command=["sleep", "infinity"],
            name=container_name(orphan_cid),
            labels={
                LABEL_MANAGED: "true",
                LABEL_RUNNER: runner_id,
                LABEL_CONVERSATION: orphan_cid,
                TEST_RUN_LABEL: TEST_RUN,
            },
            host_config=docker_client.create_host_config(init=True),
        )
        docker_client.start(orphan)
        stale = await appender.append(
            command(moved_cid, "echo stale")
        )  # queued for the dead runner
        await appender.append(
            RuntimeLost(
                conversation_id=moved_cid,
                source=EventSource.ENVIRONMENT,
                runner_id=runner_id,
                reason="test: declared lost",
            )
        )

        runner_processes.append(RunnerProcess(environment, log))
        interrupted = await wait_for(js, cid, reply_to(in_flight, ErrorObservation), seconds=20)
        assert isinstance(interrupted, ErrorObservation)
        assert interrupted.code == "runtime_restarted"
        assert not any(  # answered once, never re-run
            reply_to(in_flight, CmdOutputObservation)(event) for event in await read_log(js, cid)
        )
        (still,) = containers_of(docker_client, runner_id)  # the moved one was given back
        assert still["Id"] == container["Id"]  # re-attached, not recreated

        after = await appender.append(
            command(cid, "cat state.txt; pwd; pgrep -f 'sleep 60' || echo no-leftovers")
        )
        continued = await wait_for(js, cid, reply_to(after, CmdOutputObservation))
        assert isinstance(continued, CmdOutputObservation)
        assert "a new shell was started" in continued.content
        assert continued.content.splitlines()[-3:] == ["kept", "/workspace", "no-leftovers"]

        stop = await appender.append(
            RuntimeControlRequested(
                conversation_id=cid, source=EventSource.AGENT, action=RuntimeControl.STOP
            )
        )
        await wait_for(js, cid, status(stop, RuntimeStatus.STOPPED))
        # The work queued for the lost runtime was dropped, not run: nothing answered it.
        assert not [e for e in await read_log(js, moved_cid) if e.cause == stale.id]
        runner_processes[1].kill(signal.SIGTERM)
        assert runner_processes[1].process.returncode == 0, log.read_text()
        # JSON log lines: the conversation is a field of the line, not words of the message.
        given_back = {
            (line["message"], line.get("conversation_id"))
            for line in map(json.loads, log.read_text().splitlines())
        }
        assert (f"CmdRunAction {stale.id}: its runtime was lost here", moved_cid) in given_back
        assert containers_of(docker_client, runner_id) == []  # the orphan too
        assert f"removed {container_name(orphan_cid)}" in log.read_text()
    await js.delete_consumer(
        subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(runner_id)
    )
