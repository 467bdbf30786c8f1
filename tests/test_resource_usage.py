"""Resource usage through the public API on a real stack, on docker and on local (bubblewrap):
a command that allocates about 200 MB shows a peak of at least 200 MB in a ResourceUsage event
on the live stream and in GET /events, the conversation's GET carries the latest usage, and the
resources analytics report the peak."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest

from .conftest import Stack, running_stack
from .public_api import events_until_final, open_events_ws, rest_events_when_projected

pytestmark = pytest.mark.slow

MB = 1024 * 1024
ALLOCATE = 'python3 -c "b = bytearray(210*1024*1024); import time; time.sleep(3)"'
SCRIPT = {
    "steps": [
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": ALLOCATE}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Allocated."}}]},
    ]
}
WAIT_SECONDS = 90


def _docker_available() -> bool:
    try:
        client = docker.from_env()
        client.images.get("taskbus-sandbox:latest")
    except docker.errors.DockerException:
        return False
    return True


@pytest.fixture(
    scope="module",
    params=["local", pytest.param("docker", marks=pytest.mark.docker)],
)
def backend_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    backend: str = request.param
    if backend == "docker" and not _docker_available():
        pytest.skip("no Docker engine with the sandbox image")
    with running_stack(
        tmp_path_factory.mktemp(f"usage-{backend}"),
        SCRIPT,
        TASKBUS_BACKEND=backend,
        TASKBUS_USAGE_INTERVAL_SECONDS="0.5",
    ) as running:
        yield backend, running


async def _eventually(read: Any, accept: Any, what: str, seconds: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = await read()
        if accept(value):
            return value
        assert time.monotonic() < deadline, f"{what}: {value}"
        await asyncio.sleep(0.3)


async def test_a_200_mb_allocation_shows_in_usage_get_and_analytics(
    backend_stack: tuple[str, Stack],
) -> None:
    backend, stack = backend_stack
    async with stack.client() as api:
        response = await api.post(
            "/api/conversations", json={"initial_user_msg": "Allocate 210 MB for a moment."}
        )
        assert response.status_code == 201, response.text
        cid = response.json()["conversation_id"]

        async with open_events_ws(stack, cid, after_id=-1) as ws:
            live = await events_until_final(ws)
        assert live[-1]["status"] == "FINISHED", live[-1]
        ready = [e for e in live if e["kind"] == "RuntimeStatusChanged" and e.get("backend")]
        assert ready and ready[0]["backend"] == backend

        # On the live stream: OpenHands' no-op observation, Taskbus' figures at the top level.
        samples = [e for e in live if e["kind"] == "ResourceUsage"]
        assert samples, [e["kind"] for e in live]
        assert all(e["observation"] == "null" and e["extras"] == {} for e in samples)
        assert all(e["source"] == "environment" and e["cause"] is None for e in samples)
        # A local runner that may not create cgroups (not root) sums the sandbox's processes.
        local_by = "cgroup" if os.geteuid() == 0 else "process-tree"
        expected_by = "docker" if backend == "docker" else local_by
        assert {e["measured_by"] for e in samples} == {expected_by}
        peak = max(e["memory_peak_bytes"] for e in samples)
        assert peak >= 200 * MB, samples
        assert any(e["cpu_seconds"] > 0 and e["pids"] >= 1 for e in samples)
        command = next(e for e in live if e["kind"] == "CmdOutputObservation")
        assert command["extras"]["metadata"]["exit_code"] == 0, command

        # The same events through GET /events.
        rest = await rest_events_when_projected(api, cid, live[-1]["id"] + 1)
        assert [e for e in rest if e["kind"] == "ResourceUsage"][: len(samples)] == samples

        # GET of the conversation: the latest sample (the peak holds since the sandbox started).
        async def conversation() -> dict[str, Any]:
            answer = await api.get(f"/api/conversations/{cid}")
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        info = await _eventually(
            conversation,
            lambda body: (
                body["resource_usage"] is not None
                and body["resource_usage"]["event_id"] >= samples[-1]["id"]
            ),
            "the latest usage in GET",
        )
        usage = info["resource_usage"]
        assert usage["memory_peak_bytes"] >= 200 * MB
        assert usage["measured_by"] == expected_by
        listed = await api.get("/api/conversations")
        assert listed.status_code == 200
        (row,) = [c for c in listed.json()["results"] if c["conversation_id"] == cid]
        assert row["resource_usage"]["memory_peak_bytes"] >= 200 * MB

        # Analytics: the conversation's peak memory and CPU time.
        async def resources() -> dict[str, Any]:
            answer = await api.get("/api/analytics/resources")
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        report = await _eventually(
            resources,
            lambda body: any(c["conversation_id"] == cid for c in body["conversations"]),
            "the conversation in the resources report",
        )
        (mine,) = [c for c in report["conversations"] if c["conversation_id"] == cid]
        assert mine["memory_peak_bytes"] >= 200 * MB
        assert mine["cpu_seconds"] > 0 and mine["samples"] >= len(samples)
        bad = await api.get("/api/analytics/resources", params={"limit": 0})
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
