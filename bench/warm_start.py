"""create -> RUNNING on docker with and without the warm pool, where the time goes, and how many
containers are left running after a batch of tasks (issue 13, acceptance 1 first figure and 3).

    uv run python bench/warm_start.py [--pool 2] [--starts 15] [--tasks 500]

Each run is a fresh cluster (devtools.cluster_stack: one of each service, the docker backend)
with a scripted model that finishes at once, and `sandbox_release_seconds` of 1 s.
- create -> RUNNING: the POST sent (client clock) to `ConversationStatusChanged(RUNNING)` stored
  (the stream's clock, the same host), `--starts` conversations one at a time, each once the pool
  is full again (a pool that keeps up with arrivals) and the previous one's container given
  back; first without a pool (the same-run
  reference), then with `--pool` warm containers. Target: p50 <= 150 ms with the pool.
  The breakdown, from the stored times of the conversation's events: POST -> ConversationCreated
  (gateway, command, admission), -> RuntimeRequested (placement), -> RuntimeStatusChanged
  starting (the runner picks the request up), -> ready (the sandbox: warm hand-over or container
  start, then the shell's first marker), -> RUNNING (session-manager reacts).
- give-back: `--tasks` tasks created 16 at a time on the pool's cluster; once all ended and the
  release period passed, the sandbox containers still running beyond the pool's (target 0), and
  the most seen running at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from taskbus.contracts.events import (
    AnyEvent,
    ConversationCreated,
    ConversationStatusChanged,
    RuntimeRequested,
    RuntimeStatusChanged,
    UnknownEvent,
)
from taskbus.contracts.status import ConversationStatus, RuntimeStatus
from taskbus.devtools.cluster_stack import Cluster, ClusterSettings, StoredEvents, running_cluster
from taskbus.runtime_runner.docker_sandbox import WARM_NAME_PREFIX

SCRIPT: dict[str, Any] = {
    "description": "warm_start bench: finish at once.",
    "steps": [{"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]}],
}
RELEASE_SECONDS = 1.0
WAIT_SECONDS = 120.0
STAGES = ("created", "requested", "starting", "ready", "RUNNING")


def cluster_settings(pool: int, label: str) -> ClusterSettings:
    return ClusterSettings(
        nats_nodes=1,
        session_managers=1,
        runners=1,
        gateways=1,
        script=SCRIPT,
        settings={
            "TASKBUS_BACKEND": "docker",
            "TASKBUS_SANDBOX_LABELS": label,
            "TASKBUS_RUNNER_WARM_POOL": str(pool),
            "TASKBUS_SANDBOX_RELEASE_SECONDS": str(RELEASE_SECONDS),
            "TASKBUS_MAX_RUNNING": "16",
            "TASKBUS_MAX_CONCURRENT_CONVERSATIONS": "16",
            "TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT": "16",
            "TASKBUS_CONCURRENCY_POLICY": "queue",
            "TASKBUS_MAX_QUEUED_CONVERSATIONS": "1000",
            "TASKBUS_CREATE_BURST": "1000",
            "TASKBUS_CREATE_RATE_PER_MINUTE": "100000",
        },
    )


def running_containers(label: str) -> list[str]:
    client = docker.APIClient()
    try:
        listed = client.containers(filters={"label": label})
        return [str(c["Names"][0]).lstrip("/") for c in listed]
    finally:
        client.close()


async def until(condition: Any, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {seconds} s")
        await asyncio.sleep(0.02)


def stage_times(events: list[AnyEvent | UnknownEvent], stored: list[Any]) -> dict[str, float]:
    """When each stage's event was stored (epoch seconds); the first of each."""
    times: dict[str, float] = {}
    for event, at in zip(events, stored, strict=True):
        match event:
            case ConversationCreated():
                stage = "created"
            case RuntimeRequested():
                stage = "requested"
            case RuntimeStatusChanged(status=RuntimeStatus.STARTING):
                stage = "starting"
            case RuntimeStatusChanged(status=RuntimeStatus.READY):
                stage = "ready"
            case ConversationStatusChanged(status=ConversationStatus.RUNNING):
                stage = "RUNNING"
            case _:
                continue
        times.setdefault(stage, at.timestamp())
    return times


async def create(api: httpx.AsyncClient, cluster: Cluster) -> str:
    response = await api.post(
        f"{cluster.gateway_urls[0]}/api/conversations", json={"initial_user_msg": "go"}
    )
    if response.status_code != 201:
        raise AssertionError(f"create answered {response.status_code}: {response.text}")
    return str(response.json()["conversation_id"])


async def starts(
    cluster: Cluster, stored: StoredEvents, label: str, pool: int, count: int
) -> list[dict[str, float]]:
    """Per start: the time of each stage after the POST, in ms."""

    async def settled() -> bool:
        """The pool full and the previous conversation's container given back (its removal
        would otherwise run beside the next start)."""
        names = await asyncio.to_thread(running_containers, label)
        warm = sum(name.startswith(WARM_NAME_PREFIX) for name in names)
        return warm >= pool and warm == len(names)

    figures = []
    async with httpx.AsyncClient(headers=cluster.headers, timeout=60) as api:
        for _ in range(count):
            await until(settled)
            sent = time.time()
            cid = await create(api, cluster)

            async def running(cid: str = cid) -> bool:
                return stored.status(cid) not in (None, ConversationStatus.STARTING)

            await until(running)
            times = stage_times(stored.events[cid], stored.stored_at[cid])
            figures.append({stage: (times[stage] - sent) * 1000 for stage in STAGES})
            await stored.until_ended([cid], WAIT_SECONDS)
    return figures


async def give_back(cluster: Cluster, stored: StoredEvents, label: str, tasks: int) -> None:
    most = 0

    async def count() -> None:
        nonlocal most
        while True:
            most = max(most, len(await asyncio.to_thread(running_containers, label)))
            await asyncio.sleep(0.5)

    counting = asyncio.create_task(count())
    started = time.monotonic()
    ids = await cluster.create_conversations(tasks, "go")
    await stored.until_ended(ids, 30 * 60)
    ran = time.monotonic() - started
    # The release period, the session-manager's check and the removal itself.
    await asyncio.sleep(RELEASE_SECONDS + 5)
    counting.cancel()
    left = [n for n in running_containers(label) if not n.startswith(WARM_NAME_PREFIX)]
    finished = sum(stored.status(c) == ConversationStatus.FINISHED for c in ids)
    print(
        f"\ngive-back: {tasks} tasks ({finished} FINISHED) in {ran:.1f} s "
        f"({tasks / ran:.1f} tasks/s); at most {most} containers running at once; "
        f"{len(left)} left running {RELEASE_SECONDS + 5:g} s after the last ended, beyond "
        f"the pool (target 0){': ' + ', '.join(left[:5]) if left else ''}"
    )


async def run(
    pool: int, options: argparse.Namespace, cold: list[dict[str, float]] | None = None
) -> list[dict[str, float]]:
    """The starts of a cluster with a pool of `pool`; with `cold` (the reference run's), the
    table of both, then the give-back batch on this cluster."""
    label = f"taskbus.bench={uuid.uuid4().hex[:12]}"
    data_dir = Path(tempfile.mkdtemp(prefix="taskbus-warm-"))
    async with running_cluster(data_dir, cluster_settings(pool, label)) as cluster:
        nc = await cluster.admin()
        stored = StoredEvents()
        await stored.follow(nc)
        figures = await starts(cluster, stored, label, pool, options.starts)
        if cold is not None:
            print_starts(cold, figures, pool)
            if options.tasks:
                await give_back(cluster, stored, label, options.tasks)
        await nc.close()
    return figures


def row(name: str, figures: list[dict[str, float]]) -> str:
    """Each stage's own time (p50 over the starts), then the total."""
    cells = []
    previous = [0.0] * len(figures)
    for stage in STAGES:
        own = [f[stage] - p for f, p in zip(figures, previous, strict=True)]
        cells.append(statistics.median(own))
        previous = [f[stage] for f in figures]
    total = statistics.median(f["RUNNING"] for f in figures)
    return f"{name:<16}" + "".join(f"{c:>11.1f}" for c in cells) + f"{total:>11.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--starts", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=500)
    options = parser.parse_args()
    await run(options.pool, options, await run(0, options))


def print_starts(cold: list[dict[str, float]], warm: list[dict[str, float]], pool: int) -> None:
    print("\ncreate -> RUNNING on docker, p50 ms of each step (median of the step's own time)")
    print(f"{'':<16}" + "".join(f"{'->' + s:>11}" for s in STAGES) + f"{'total':>11}")
    print(row("cold (no pool)", cold))
    print(row(f"warm pool of {pool}", warm))
    cold_p50 = statistics.median(f["RUNNING"] for f in cold)
    warm_p50 = statistics.median(f["RUNNING"] for f in warm)
    print(
        f"\ncreate -> RUNNING p50: warm {warm_p50:.1f} ms vs cold {cold_p50:.1f} ms (same run, "
        f"{warm_p50 / cold_p50:.2f}x); target <= 150 ms",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
