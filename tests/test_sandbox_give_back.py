"""Docker sandboxes from a warm pool, given back promptly: after a batch of tasks no container is
left running beyond the release policy but the pool's, and a later message gets a fresh sandbox
on the kept workspace. The real stack (`taskbus up`) on the docker backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from taskbus.devtools.local_stack import sandbox_label
from taskbus.runtime_runner.docker_sandbox import WARM_NAME_PREFIX

from .conftest import Stack, running_stack
from .public_api import events_until_final, open_events_ws

pytestmark = [pytest.mark.slow, pytest.mark.docker]

TASKS = 20
POOL = 2
SCRIPT = {
    "description": "Give-back test: one file written, then finish; after a later message, the"
    " file read back, then finish.",
    "steps": [
        {
            "content": "Writing a file.",
            "tool_calls": [
                {"name": "execute_bash", "arguments": {"command": "echo kept > kept.txt"}}
            ],
        },
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]},
        # Beyond the first run's steps: what the later message makes the agent do (a script
        # that ran out would leave the conversation waiting for its user, never FINISHED).
        {
            "content": "Reading it back.",
            "tool_calls": [{"name": "execute_bash", "arguments": {"command": "cat kept.txt"}}],
        },
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Done again."}}]},
    ],
}
SETTINGS = {
    "TASKBUS_BACKEND": "docker",
    "TASKBUS_RUNNER_WARM_POOL": str(POOL),
    "TASKBUS_SANDBOX_RELEASE_SECONDS": "1",
    "TASKBUS_MAX_RUNNING": "8",
    "TASKBUS_MAX_CONCURRENT_CONVERSATIONS": "8",
    "TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT": "8",
    "TASKBUS_CONCURRENCY_POLICY": "queue",
    "TASKBUS_CREATE_BURST": str(TASKS),
    "TASKBUS_CREATE_RATE_PER_MINUTE": "100000",
}


@pytest.fixture(scope="module")
def docker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        docker.from_env().ping()
    except docker.errors.DockerException as error:
        pytest.skip(f"no Docker engine answers: {error}")
    with running_stack(tmp_path_factory.mktemp("warm"), SCRIPT, **SETTINGS) as running:
        yield running


def running_containers(data_dir: Path) -> list[str]:
    engine = docker.from_env()
    try:
        listed = engine.api.containers(filters={"label": sandbox_label(data_dir.resolve())})
        return sorted(str(c["Names"][0]).lstrip("/") for c in listed)
    finally:
        engine.close()


async def until_only_the_pool_runs(data_dir: Path, seconds: float = 60) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        names = await asyncio.to_thread(running_containers, data_dir)
        if all(name.startswith(WARM_NAME_PREFIX) for name in names) or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.5)


async def create(api: httpx.AsyncClient, message: str) -> str:
    created = await api.post("/api/conversations", json={"initial_user_msg": message})
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["conversation_id"]
    return conversation_id


async def until_finished(stack: Stack, conversation_id: str) -> None:
    async with open_events_ws(stack, conversation_id, -1) as ws:
        events = await events_until_final(ws)
    assert events[-1]["status"] == "FINISHED", events[-1]


async def test_after_a_batch_of_tasks_only_the_warm_pool_is_left_running(
    docker_stack: Stack,
) -> None:
    async with docker_stack.client() as api:
        # Created one after another (a loaded CI machine answers a burst of 20 slowly), run
        # side by side.
        ids = [await create(api, f"task {i}") for i in range(TASKS)]
        await asyncio.gather(*(until_finished(docker_stack, cid) for cid in ids))
        left = await until_only_the_pool_runs(docker_stack.data_dir)
        assert all(name.startswith(WARM_NAME_PREFIX) for name in left), left
        assert len(left) <= POOL
        # A later message: a fresh sandbox on the kept workspace, then given back again.
        cid = ids[0]
        async with open_events_ws(docker_stack, cid, -1) as ws:
            before = await events_until_final(ws)  # the first run, replayed
            sent = await api.post(f"/api/conversations/{cid}/message", json={"message": "again"})
            assert sent.status_code == 202, sent.text
            later = await events_until_final(ws)
        assert later[-1]["status"] == "FINISHED", later[-1]
        ready = [e for e in later if e["kind"] == "RuntimeStatusChanged" and e["status"] == "ready"]
        assert len(ready) == 1 and ready[0]["backend"] == "docker", ready
        (read_back,) = [e for e in later if e["kind"] == "CmdOutputObservation"]
        assert read_back["content"].strip() == "kept", read_back
        assert before[-1]["id"] < ready[0]["id"]
        left = await until_only_the_pool_runs(docker_stack.data_dir)
        assert all(name.startswith(WARM_NAME_PREFIX) for name in left), left
