"""Fault tests (ARCHITECTURE.md §7): kill -9 or SIGSTOP services mid-task, restart NATS, drop
WebSocket clients; the log keeps every event exactly once and in order, and the task still
finishes.

They share one stack of their own (a killed service must not disturb the end-to-end tests),
playing `fault_script.json`: a plan, a 3 s command that appends a line to `runs.txt`, a `cat
runs.txt` that shows how often it ran, a README, finish. The launcher writes each supervised
process' pid to `<data_dir>/pids/<name>.pid` on every (re)start; a test kills by that pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import Stack, running_stack
from .public_api import FINAL, next_event, open_events_ws, rest_events_when_projected

pytestmark = pytest.mark.slow

FAULT_SCRIPT = Path(__file__).with_name("fault_script.json")
SLOW_COMMAND_MARK = "sleep 3"
TASK = "Run the slow command once, check how often it ran, write a README.md, then finish."
# The agent's actions `fault_script.json` asks for, each exactly once.
SCRIPTED_ACTIONS = Counter(
    {"TaskTrackingAction": 1, "CmdRunAction": 2, "FileEditAction": 1, "AgentFinishAction": 1}
)
EXECUTABLE_ACTIONS = {"CmdRunAction", "FileReadAction", "FileWriteAction", "FileEditAction"}
RESTART_SECONDS = 60
APPEND_TIMEOUT_SECONDS = 5  # nats-py's JetStream request timeout, the services' default
TASK_SECONDS = 90

Event = dict[str, Any]


def _fault_stack(data_dir: Path, **settings: str) -> contextlib.AbstractContextManager[Stack]:
    return running_stack(data_dir, json.loads(FAULT_SCRIPT.read_text()), **settings)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The backend is `auto`: docker where an engine has the sandbox image, else local."""
    with _fault_stack(tmp_path_factory.mktemp("fault-stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def local_fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with _fault_stack(
        tmp_path_factory.mktemp("local-fault-stack"), TASKBUS_BACKEND="local"
    ) as stack:
        yield stack


@pytest.fixture
async def api(fault_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with fault_stack.client(timeout=30) as client:
        yield client


def _pid(stack: Stack, name: str) -> int:
    return int((stack.data_dir / "pids" / f"{name}.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _kill(stack: Stack, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
    """Signal the supervised process `name`; return its pid once it has exited."""
    pid = _pid(stack, name)
    os.kill(pid, sig)
    for _ in range(300):
        if not _alive(pid):
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} ({pid}) did not exit")


async def _restarted(stack: Stack, name: str, old_pid: int) -> int:
    """The pid of the process the launcher started in place of `old_pid`."""
    deadline = time.monotonic() + RESTART_SECONDS
    while (pid := _pid(stack, name)) == old_pid or not _alive(pid):
        assert time.monotonic() < deadline, f"{name} was not restarted"
        await asyncio.sleep(0.1)
    return pid


OnEvent = Callable[[Event], Awaitable[None]]


def once_at(kind: str, act: Callable[[], Awaitable[object]]) -> OnEvent:
    """Run `act` when the first event of `kind` arrives, and never again."""
    fired = False

    async def on_event(event: Event) -> None:
        nonlocal fired
        if not fired and event["kind"] == kind:
            fired = True
            await act()

    return on_event


def _is_final(event: Event) -> bool:
    return event["kind"] == "ConversationStatusChanged" and event["status"] in FINAL


async def follow(
    stack: Stack, conversation_id: str, on_event: OnEvent | None = None
) -> list[Event]:
    """Every event up to the final status, over WebSockets that resume after the last id seen
    whenever a connection drops or is refused (a fault may take the gateway's NATS away).
    Each event must be the next id: a gap, a repeat or a reordering fails here."""
    events: list[Event] = []
    deadline = time.monotonic() + TASK_SECONDS
    while time.monotonic() < deadline:
        try:
            async with open_events_ws(stack, conversation_id, len(events) - 1) as ws:
                while True:
                    event = await next_event(ws)
                    assert event["id"] == len(events), (event, [e["id"] for e in events])
                    events.append(event)
                    if on_event is not None:
                        await on_event(event)
                    if _is_final(event):
                        return events
        except (ConnectionClosed, InvalidStatus, OSError, TimeoutError):
            await asyncio.sleep(0.5)
    raise AssertionError(f"no final status within {TASK_SECONDS} s: {events[-3:]}")


async def _start_task(api: httpx.AsyncClient) -> str:
    created = await api.post("/api/conversations", json={"initial_user_msg": TASK})
    assert created.status_code == 201, created.text
    return str(created.json()["conversation_id"])


def answers_by_action(events: list[Event]) -> dict[int, list[Event]]:
    """Each executable action's observations (by action id), chunks excluded."""
    answers: dict[int, list[Event]] = {
        e["id"]: [] for e in events if e["kind"] in EXECUTABLE_ACTIONS
    }
    for event in events:
        # Chunks are OpenHands' no-op `null` observation: output on the way, not an answer.
        if event.get("observation") not in (None, "null") and event["cause"] in answers:
            answers[event["cause"]].append(event)
    return answers


async def _event_store_answers(api: httpx.AsyncClient, conversation_id: str) -> None:
    """Wait out a (re)starting event-store: the gateway answers 503 until it serves queries."""
    deadline = time.monotonic() + RESTART_SECONDS
    while True:
        response = await api.get(f"/api/conversations/{conversation_id}/events")
        if response.status_code != 503 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return
        await asyncio.sleep(0.2)


async def assert_log_intact(
    stack: Stack, api: httpx.AsyncClient, conversation_id: str, followed: list[Event]
) -> None:
    """The task finished once, with each scripted step taken once and each action answered
    once; a fresh WebSocket replays the very same events, and so does the projection."""
    statuses = [e["status"] for e in followed if e["kind"] == "ConversationStatusChanged"]
    assert statuses[-1] == "FINISHED", statuses
    actions = Counter(e["kind"] for e in followed if e.get("source") == "agent" and "action" in e)
    assert actions == SCRIPTED_ACTIONS, actions
    assert sum(e["kind"] == "LLMMetrics" for e in followed) == SCRIPTED_ACTIONS.total()
    answers = answers_by_action(followed)
    assert all(len(found) == 1 for found in answers.values()), answers

    replayed = await follow(stack, conversation_id)
    assert replayed == followed
    await _event_store_answers(api, conversation_id)
    projected = await rest_events_when_projected(api, conversation_id, len(followed))
    assert projected[: len(followed)] == followed
    conversation = (await api.get(f"/api/conversations/{conversation_id}")).json()
    assert conversation["taskbus_status"] == "FINISHED", conversation


def _slow_command_output(events: list[Event]) -> Event:
    slow = next(
        e["id"] for e in events if SLOW_COMMAND_MARK in e.get("args", {}).get("command", "")
    )
    (answer,) = answers_by_action(events)[slow]
    return answer


def _runs_recorded(events: list[Event]) -> int:
    """How often the slow command ran to its end, as `cat runs.txt` showed: a line each."""
    check = next(e["id"] for e in events if e.get("args", {}).get("command") == "cat runs.txt")
    (answer,) = answers_by_action(events)[check]
    return str(answer["content"]).splitlines().count("run")


async def test_session_manager_killed_mid_command_resumes_without_repeating_a_step(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    killed: list[int] = []

    async def kill_session_manager() -> None:
        killed.append(await _kill(fault_stack, "session-manager"))

    conversation_id = await _start_task(api)
    events = await follow(
        fault_stack, conversation_id, once_at("CmdRunAction", kill_session_manager)
    )

    assert killed, "the fault never fired"
    await _restarted(fault_stack, "session-manager", killed[0])
    await assert_log_intact(fault_stack, api, conversation_id, events)
    # The command ran exactly once, and its output reached the restarted agent loop.
    assert _slow_command_output(events)["extras"]["exit_code"] == 0
    assert _runs_recorded(events) == 1


async def test_event_store_killed_mid_task_projects_the_log_exactly(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    killed: list[int] = []

    async def kill_event_store() -> None:
        killed.append(await _kill(fault_stack, "event-store"))

    conversation_id = await _start_task(api)
    events = await follow(fault_stack, conversation_id, once_at("CmdRunAction", kill_event_store))

    assert killed, "the fault never fired"
    await _restarted(fault_stack, "event-store", killed[0])
    await assert_log_intact(fault_stack, api, conversation_id, events)
    assert _runs_recorded(events) == 1


@pytest.mark.parametrize("stack_fixture", ["fault_stack", "local_fault_stack"])
async def test_runtime_runner_killed_mid_command_answers_it_with_a_clear_error(
    stack_fixture: str, request: pytest.FixtureRequest
) -> None:
    """The command is cut off, and never run a second time: the restarted runner answers it
    with `ErrorObservation(code="runtime_restarted")`, and later actions run in the same
    workspace (docker re-attaches the container; a local sandbox dies with the runner, so the
    restarted one starts a new shell on its workspace). The agent goes on to FINISHED."""
    stack: Stack = request.getfixturevalue(stack_fixture)
    killed: list[int] = []

    async def kill_runtime_runner() -> None:
        killed.append(await _kill(stack, "runtime-runner"))

    async with stack.client(timeout=30) as api:
        conversation_id = await _start_task(api)
        # The first chunk ("started") shows the command is running in the sandbox.
        events = await follow(
            stack, conversation_id, once_at("CmdOutputChunk", kill_runtime_runner)
        )

        assert killed, "the fault never fired"
        await _restarted(stack, "runtime-runner", killed[0])
        await assert_log_intact(stack, api, conversation_id, events)

    backend = next(
        e["backend"]
        for e in events
        if e["kind"] == "RuntimeStatusChanged" and e["status"] == "ready"
    )
    if stack_fixture == "local_fault_stack":
        assert backend == "local"
    cut_off = _slow_command_output(events)
    assert cut_off["kind"] == "ErrorObservation", cut_off
    assert cut_off["code"] == "runtime_restarted", cut_off
    # Later actions ran in the sandbox's workspace; the cut-off command ran at most once (in
    # practice it dies with the runner's shell: no "run" line).
    later = [found[0] for i, found in answers_by_action(events).items() if i > cut_off["cause"]]
    assert later and all(answer["kind"] != "ErrorObservation" for answer in later), later
    assert _runs_recorded(events) <= 1


async def test_websocket_dropped_mid_stream_resumes_after_the_last_event_read(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    conversation_id = await _start_task(api)
    async with open_events_ws(fault_stack, conversation_id, -1) as ws:
        first_part: list[Event] = []
        while not first_part or first_part[-1]["kind"] != "CmdRunAction":
            first_part.append(await next_event(ws))
        # Gone without a close handshake and without reading what the server sends next.
        ws.transport.abort()
    k = first_part[-1]["id"]
    assert [e["id"] for e in first_part] == list(range(k + 1))

    rest: list[Event] = []
    async with open_events_ws(fault_stack, conversation_id, k) as ws:
        while not rest or not _is_final(rest[-1]):
            rest.append(await next_event(ws))
    assert [e["id"] for e in rest] == list(range(k + 1, k + 1 + len(rest)))
    await assert_log_intact(fault_stack, api, conversation_id, first_part + rest)


async def test_nats_server_restarted_mid_command_services_reconnect_and_finish(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    """nats-server stopped and started again on the same port and store directory (the
    launcher restarts it) while a command runs: the services reconnect, nothing in the log is
    lost or repeated, and the task finishes."""
    stopped: list[int] = []

    async def restart_nats() -> None:
        stopped.append(await _kill(fault_stack, "nats-server", signal.SIGTERM))

    conversation_id = await _start_task(api)
    events = await follow(fault_stack, conversation_id, once_at("CmdOutputChunk", restart_nats))

    assert stopped, "the fault never fired"
    await _restarted(fault_stack, "nats-server", stopped[0])
    await assert_log_intact(fault_stack, api, conversation_id, events)
    assert _runs_recorded(events) == 1


async def test_nats_server_hung_then_killed_mid_command_runs_it_once(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    """nats-server stopped (SIGSTOP) at the slow command's first output, for longer than an
    append waits for its ack, then killed: what the runner sent meanwhile (the command's
    record, and before the fix the nak of its delivery) dies unread with it. The record must
    be sent again to the restarted server; failing the delivery instead made JetStream
    redeliver it after ack_wait and the runner run the command a second time (a nats-server
    restart in CI hit this)."""

    async def hang_then_kill_nats() -> None:
        pid = _pid(fault_stack, "nats-server")
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(APPEND_TIMEOUT_SECONDS + 4)  # the command ends meanwhile (3 s)
        killed = await _kill(fault_stack, "nats-server")  # SIGKILL reaches a stopped process
        await _restarted(fault_stack, "nats-server", killed)

    conversation_id = await _start_task(api)
    events = await follow(
        fault_stack, conversation_id, once_at("CmdOutputChunk", hang_then_kill_nats)
    )

    await assert_log_intact(fault_stack, api, conversation_id, events)
    assert _slow_command_output(events)["extras"]["exit_code"] == 0
    assert _runs_recorded(events) == 1


# Services whose instances beat into the health bucket: launcher name -> health name.
BEATING = {
    "session-manager": "session_manager",
    "runtime-runner": "runtime_runner",
    "event-store": "event_store",
}
STALE_WAIT_SECONDS = 60  # heartbeats count as stale after observability_health.STALE_SECONDS


async def _until_health(api: httpx.AsyncClient, ready: bool) -> None:
    """Until /api/health reads every beating service as `ready` (or as not ready)."""
    deadline = time.monotonic() + STALE_WAIT_SECONDS
    while True:
        response = await api.get("/api/health")
        assert response.status_code == 200, response.text
        services = response.json()["services"]
        if all(services[name]["ready"] is ready for name in BEATING.values()):
            return
        assert time.monotonic() < deadline, (ready, services)
        await asyncio.sleep(0.5)


async def test_hung_services_read_not_ready_and_the_task_finishes_after_sigcont(
    fault_stack: Stack, api: httpx.AsyncClient
) -> None:
    """Issue 13: SIGSTOP of session-manager, runtime-runner and event-store while the slow
    command runs. Stopped, they are reported not ready (their heartbeats go stale) and nothing
    moves; continued (not restarted), the task finishes with nothing lost or repeated."""
    pids = {name: _pid(fault_stack, name) for name in BEATING}
    await _until_health(api, ready=True)
    conversation_id = await _start_task(api)

    async def hang_them() -> None:
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            await _until_health(api, ready=False)
        finally:
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)

    followed = await follow(fault_stack, conversation_id, once_at("CmdRunAction", hang_them))
    await _until_health(api, ready=True)
    assert {name: _pid(fault_stack, name) for name in BEATING} == pids  # continued, not restarted
    await assert_log_intact(fault_stack, api, conversation_id, followed)


async def test_a_hung_gateway_answers_nothing_and_answers_again_after_sigcont(
    fault_stack: Stack,
) -> None:
    gateway = _pid(fault_stack, "gateway")
    async with fault_stack.client(timeout=3) as hung:
        os.kill(gateway, signal.SIGSTOP)
        try:
            with pytest.raises(httpx.TimeoutException):
                await hung.get("/api/health")
        finally:
            os.kill(gateway, signal.SIGCONT)
    async with fault_stack.client(timeout=30) as api:
        assert (await api.get("/api/health")).status_code == 200
    assert _pid(fault_stack, "gateway") == gateway  # the launcher did not restart it
