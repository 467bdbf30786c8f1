"""Tasks per second with the scripted model, on the local or the docker backend (issue 13,
acceptance 1), beside the same run's JetStream ceiling.

    uv run python bench/throughput.py [--tasks 300] [--slots 8] [--in-flight 32]
                                      [--backend local|docker]

`taskbus up` in a temp dir (local: bubblewrap; docker: a warm pool of `--slots` containers, and
a finished task's container given back after a second), the packaged demo task (plan, a command,
a file written, the plan updated, finish: the one `just up` shows). `--tasks` are POSTed with
at most `--in-flight` requests at once, `--slots` of them run at once; tasks/s is the tasks
divided by the time from the first POST to the last FINISHED (the status events, seen on the
bus as they are appended), after `--slots` warm-up tasks: a fresh session-manager imports
litellm on its first LLM call, seconds of CPU no steady state pays. The reference: raw
awaited `js.publish` of events on the same server in the same run (appender_bench.py's
writers), divided by the events a task wrote, is the rate the log alone would allow. The second:
litellm alone (litellm_alone.py), replaying 200 of the run's own LLM requests in a process of
its own, is the rate one session-manager process would allow if it did nothing else, since
every call runs on its one event loop. Each process's CPU share tells where the rest goes.
The bench serves the scripted model itself, to record the requests; its CPU counts as the
bench's. Target: >= 30 tasks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect as bus_connect
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools.cluster_stack import cpu_seconds
from taskbus.devtools.launcher import scripted_model_env
from taskbus.devtools.local_stack import read_state
from taskbus.devtools.scripted_llm import ScriptedLLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # appender_bench, idle_memory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stack the tests start
from appender_bench import raw_rate
from idle_memory import descendants, label

from tests.conftest import Stack, running_stack

TARGET = 30.0
# The bench's own CPU (its POSTs and its tap on every event) shares the machine with the stack.
BENCH_PROCESS = "bench (POSTs, bus tap, scripted model)"
# LLM requests of the run replayed through litellm alone, after its warm-up calls.
REPLAYED = 200
REPLAY_WARM_UP = 20
RUN_SECONDS = 900


class _Id(msgspec.Struct):
    id: int


class _Status(msgspec.Struct):
    conversation_id: str
    status: str


async def run_tasks(
    stack: Stack, tasks: int, in_flight: int
) -> tuple[float, float, dict[str, float]]:
    """(tasks/s, events per task, mean seconds a task spent in each status) of `tasks` demo
    tasks run to FINISHED. The stages say what bounds the rate: with every slot busy it is
    slots / (STARTING + RUNNING), whatever the CPU left."""
    nc = await bus_connect(stack.nats_url, "bench", stack.bus_credential("admin"))
    # A core subscription also sees the publishes JetStream refused (a lost expected-sequence
    # race, retried under the next id): a conversation's events are its highest id plus one.
    last_ids: dict[str, int] = {}
    finished: set[str] = set()
    all_done = asyncio.Event()
    # conversation -> (status, when it was seen) of each status change, in order.
    changes: dict[str, list[tuple[str, float]]] = {}

    async def seen(msg: Msg) -> None:
        cid = subjects.conversation_id_of(msg.subject)
        last_ids[cid] = max(last_ids.get(cid, -1), msgspec.json.decode(msg.data, type=_Id).id)
        if msg.subject.endswith(".ConversationStatusChanged"):
            status = msgspec.json.decode(msg.data, type=_Status)
            changes.setdefault(cid, []).append((status.status, time.monotonic()))
            if status.status == ConversationStatus.FINISHED:
                finished.add(status.conversation_id)
                if len(finished) == tasks:
                    all_done.set()

    await nc.subscribe(subjects.ALL_EVENTS, cb=seen)
    gate = asyncio.Semaphore(in_flight)
    async with stack.client(timeout=60) as api:

        async def create(n: int) -> str:
            async with gate:
                answer = await api.post("/api/conversations", json={"initial_user_msg": f"{n}"})
            # 504 not-visible-yet: accepted, but the read model lagged past the gateway's wait.
            assert answer.status_code in (200, 201, 504), answer.text
            return str(answer.json()["conversation_id"])

        started = time.monotonic()
        created = await asyncio.gather(*(create(n) for n in range(tasks)))
        await asyncio.wait_for(all_done.wait(), RUN_SECONDS)
        took = time.monotonic() - started
    await nc.drain()
    assert finished == set(created)
    return tasks / took, sum(last_ids[cid] + 1 for cid in created) / tasks, stages(changes)


def stages(changes: dict[str, list[tuple[str, float]]]) -> dict[str, float]:
    """Mean seconds spent in each status before the next one, over the conversations."""
    spent: dict[str, list[float]] = {}
    for seen in changes.values():
        for (status, since), (_, until) in itertools.pairwise(seen):
            spent.setdefault(status, []).append(until - since)
    return {status: statistics.fmean(times) for status, times in spent.items()}


async def ceiling(stack: Stack) -> float:
    """Events/s of raw awaited publishes on the stack's own server (50 writers)."""
    nc = await bus_connect(stack.nats_url, "bench", stack.bus_credential("admin"))
    rate = await raw_rate(nc.jetstream(), 50, 100)
    await nc.drain()
    return rate


def cpu_by_process(stack_pid: int) -> dict[str, float]:
    """CPU seconds so far of each kind of process under the launcher (its sandboxes' commands
    count to the runner that waited for them)."""
    used: dict[str, float] = {}
    for pid in descendants(stack_pid):
        try:
            name = label(pid)
        except OSError:
            continue
        used[name] = used.get(name, 0.0) + cpu_seconds(pid)
    return used


def litellm_cpu_per_call(url: str, requests: list[dict[str, Any]]) -> float:
    """litellm_alone.py's CPU ms per call, replaying `requests` against the model at `url`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(msgspec.json.encode(requests))
        file.flush()
        command = [
            sys.executable,
            str(Path(__file__).resolve().parent / "litellm_alone.py"),
            f"--url={url}",
            f"--requests={file.name}",
            f"--warm-up={REPLAY_WARM_UP}",
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.rpartition("cpu_ms_per_call=")[2])


def backend_settings(backend: str, slots: int) -> dict[str, str]:
    if backend == "local":
        return {"TASKBUS_BACKEND": "local"}
    return {
        "TASKBUS_BACKEND": "docker",
        "TASKBUS_RUNNER_WARM_POOL": str(slots),
        "TASKBUS_SANDBOX_RELEASE_SECONDS": "1",
    }


async def main(tasks: int, slots: int, in_flight: int, backend: str) -> None:
    settings = {
        **backend_settings(backend, slots),
        "TASKBUS_RUNNER_SLOTS": str(slots),
        "TASKBUS_MAX_RUNNING": str(slots),
        "TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT": str(tasks),
        "TASKBUS_CONCURRENCY_POLICY": "queue",
        "TASKBUS_MAX_QUEUED_CONVERSATIONS": str(tasks),
        "TASKBUS_CREATE_BURST": str(tasks),
        "TASKBUS_CREATE_RATE_PER_MINUTE": "1000000",
    }
    with (
        ScriptedLLM() as model,
        tempfile.TemporaryDirectory() as tmp,
        running_stack(Path(tmp), None, **settings, **scripted_model_env(model.url)) as stack,
    ):
        async with stack.client() as api:
            user_settings = {"max_concurrent_conversations": tasks}
            assert (await api.put("/api/settings", json=user_settings)).status_code == 200
        state = read_state(stack.data_dir)
        assert state is not None, "taskbus up wrote no state"
        pid = state.pid
        await run_tasks(stack, slots, in_flight)  # the warm-up
        before, started = cpu_by_process(pid), time.monotonic()
        ours, calls_before = time.process_time(), len(model.player.requests)
        rate, per_task, spent = await run_tasks(stack, tasks, in_flight)
        after, wall = cpu_by_process(pid), time.monotonic() - started
        after[BENCH_PROCESS] = time.process_time() - ours
        answered = [r.body for r in model.player.requests[calls_before:] if r.status == 200]
        calls = len(answered) / tasks
        raw = await ceiling(stack)
        litellm_ms = litellm_cpu_per_call(model.url, answered[-(REPLAYED + REPLAY_WARM_UP) :])
    print(f"\n{tasks} demo tasks, {slots} slots, {in_flight} POSTs in flight, {backend} backend")
    print(f"{'':40}{'tasks/s':>9}{'target':>9}")
    print(f"{'log ceiling: raw publish / events':40}{raw / per_task:>9.1f}")
    print(f"{'  (raw publish events/s, events/task)':40}{raw:>9.0f}{per_task:>9.1f}")
    print(f"{'litellm alone, one process':40}{1000 / (litellm_ms * calls):>9.1f}")
    print(f"{'  (litellm CPU ms/call, LLM calls/task)':40}{litellm_ms:>9.2f}{calls:>9.1f}")
    print(f"{'demo tasks to FINISHED':40}{rate:>9.1f}{f'>= {TARGET:g}':>9}")
    print("Mean seconds a task spent in each status:")
    for status, seconds in spent.items():
        print(f"  {status:38}{seconds:>9.3f}")
    print(f"CPU cores used during the tasks (of {os.cpu_count()}):")
    shares = {name: (seconds - before.get(name, 0.0)) / wall for name, seconds in after.items()}
    for name, share in sorted(shares.items(), key=lambda item: -item[1]):
        if share >= 0.01:
            print(f"  {name:38}{share:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--backend", choices=("local", "docker"), default="local")
    options = parser.parse_args()
    asyncio.run(main(options.tasks, options.slots, options.in_flight, options.backend))
