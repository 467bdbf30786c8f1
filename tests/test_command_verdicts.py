"""Commands answer with the truth, on a real stack: each command against each reachable status is
202 or 409 exactly as the contracts' transition table says, a refused command appends nothing,
and an accepted one's events are in the log when the 202 arrives. Plus the seed's semantics
through the public API: user defaults, a message answering a confirmation, priority in
eviction, ERROR -> cleanup -> STOPPED.

STARTING is not held long enough to aim a command at it through the API (the sandbox starts in
well under a second); the pure tests cover it (services/session-manager/tests/test_commands.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from taskbus.contracts.openhands import OPENHANDS_STATUS
from taskbus.contracts.status import COMMAND_TRANSITIONS, Control, ConversationStatus

from .conftest import Stack, running_stack

pytestmark = pytest.mark.slow

S = ConversationStatus
PRIORITY_KEY = "tb_priority_verdict_test_key"
DEFAULTS_KEY = "tb_defaults_verdict_test_key"
# A user with one slot and the queue policy, whose second conversation waits (QUEUED).
QUEUE_KEY = "tb_queue_verdict_test_key"
# Shared by every conversation (the scripted model follows each one's own history): ask the user
# a question; once answered, run a command that changes the sandbox (proposed in confirmation
# mode); then finish.
SCRIPT = {
    "steps": [
        {"content": "Which file should I remove?"},
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": "rm -f notes.txt"}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]},
    ]
}
MISSING_REPOSITORY = "/nonexistent/taskbus-verdicts-repository"
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("verdicts"),
        SCRIPT,
        TASKBUS_API_KEYS=(
            f"{PRIORITY_KEY}=prioritised,{DEFAULTS_KEY}=defaulted,{QUEUE_KEY}=queueing"
        ),
        TASKBUS_MAX_PRIORITY="10",
        TASKBUS_MAX_RUNNING="16",
    ) as running:
        yield running


@pytest.fixture
async def queueing(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with stack.client(QUEUE_KEY) as client:
        settings = {"max_concurrent_conversations": 1, "concurrency_policy": "queue"}
        assert (await client.put("/api/settings", json=settings)).status_code == 200
        yield client
        # Free the one slot for the next test: the waiting one first, so it does not take it.
        for cid in reversed(HOLDERS):
            await send(client, cid, "stop")
        HOLDERS.clear()


HOLDERS: list[str] = []  # the queueing user's conversations of the current test


def client_in(
    status: ConversationStatus, api: httpx.AsyncClient, queueing: httpx.AsyncClient
) -> httpx.AsyncClient:
    return queueing if status == S.QUEUED else api


async def conversation(client: httpx.AsyncClient, cid: str) -> dict[str, Any]:
    response = await client.get(f"/api/conversations/{cid}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def reach(
    client: httpx.AsyncClient, cid: str, status: str, agent_state: str | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        info = await conversation(client, cid)
        if info["taskbus_status"] == status and agent_state in (None, info["agent_state"]):
            return info
        assert time.monotonic() < deadline, (
            f"{cid} is {info['taskbus_status']}/{info['agent_state']}"
        )
        await asyncio.sleep(0.2)


async def create(client: httpx.AsyncClient, **spec: Any) -> str:
    body = {"initial_user_msg": "Tidy up the workspace.", **spec}
    response = await client.post("/api/conversations", json=body)
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]
    return cid


async def send(client: httpx.AsyncClient, cid: str, command: str) -> httpx.Response:
    if command == "message":
        return await client.post(f"/api/conversations/{cid}/message", json={"message": "notes"})
    return await client.post(f"/api/conversations/{cid}/{command}")


# --- conversations in each reachable status --------------------------------------------------


async def waiting_for_user(client: httpx.AsyncClient, **spec: Any) -> str:
    """RUNNING, the agent asking the user a question (stable until the user answers)."""
    cid = await create(client, **spec)
    await reach(client, cid, "RUNNING", "awaiting_user_input")
    return cid


async def quiet(client: httpx.AsyncClient, cid: str, seconds: float = 1.0) -> None:
    """Wait until the log has not grown for `seconds`: the runner has answered (a stop, a
    pause), so what is appended next comes from the command under test."""
    last = (await conversation(client, cid))["last_event_id"]
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        await asyncio.sleep(seconds)
        now = (await conversation(client, cid))["last_event_id"]
        if now == last:
            return
        assert time.monotonic() < deadline, f"{cid} keeps appending"
        last = now


async def in_status(client: httpx.AsyncClient, status: ConversationStatus) -> str:
    cid = await _in_status(client, status)
    await quiet(client, cid)
    return cid


# The command that takes a conversation waiting for the user's answer to each status.
LEADS_TO = {S.PAUSED: "pause", S.STOPPED: "stop", S.FINISHED: "message"}


async def _in_status(client: httpx.AsyncClient, status: ConversationStatus) -> str:
    match status:
        case S.RUNNING:
            return await waiting_for_user(client)
        case S.PAUSED | S.STOPPED | S.FINISHED:
            cid = await waiting_for_user(client)
            assert (await send(client, cid, LEADS_TO[status])).status_code == 202
            await reach(client, cid, status)
            return cid
        case S.ERROR:
            cid = await create(client, repository=MISSING_REPOSITORY)
            await reach(client, cid, "ERROR")
            return cid
        case S.QUEUED:
            return await queued(client)
    raise AssertionError(f"no recipe for {status}")


async def queued(client: httpx.AsyncClient) -> str:
    """QUEUED behind the queueing user's one slot; both are stopped after the test."""
    HOLDERS.append(await waiting_for_user(client))
    cid = await create(client)
    HOLDERS.append(cid)
    await reach(client, cid, "QUEUED")
    return cid


async def awaiting_confirmation(client: httpx.AsyncClient, **spec: Any) -> str:
    cid = await waiting_for_user(client, confirmation_mode=True, **spec)
    assert (await send(client, cid, "message")).status_code == 202
    await reach(client, cid, "RUNNING", "awaiting_user_confirmation")
    return cid


COMMANDS: dict[str, Control] = {
    "start": Control.START,
    "stop": Control.STOP,
    "pause": Control.PAUSE,
    "resume": Control.RESUME,
    "message": Control.MESSAGE,
    "confirm": Control.CONFIRM,
    "reject": Control.CONFIRM,
}
REACHABLE = [S.QUEUED, S.RUNNING, S.PAUSED, S.STOPPED, S.FINISHED, S.ERROR]


def allowed(command: str, status: ConversationStatus) -> bool:
    return status in COMMAND_TRANSITIONS[COMMANDS[command]]


@pytest.mark.parametrize("status", REACHABLE)
async def test_refused_commands_are_409_with_the_status_and_append_nothing(
    api: httpx.AsyncClient, queueing: httpx.AsyncClient, status: ConversationStatus
) -> None:
    api = client_in(status, api, queueing)
    cid = await in_status(api, status)
    for command in COMMANDS:
        if allowed(command, status) and command not in ("confirm", "reject"):
            continue
        before = await conversation(api, cid)
        response = await send(api, cid, command)
        # confirm/reject: no action awaits the answer here, so refused wherever allowed.
        assert response.status_code == 409, (command, status, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["taskbus_status"] == status, problem
        assert problem["conversation_status"] == OPENHANDS_STATUS[status], problem
        assert problem["reason"] and problem["detail"], problem
        after = await conversation(api, cid)
        assert after["last_event_id"] == before["last_event_id"], (command, status)
        assert after["taskbus_status"] == status


ACCEPTED = [
    (command, status)
    for status in REACHABLE
    for command in COMMANDS
    if allowed(command, status) and command not in ("confirm", "reject")
]


@pytest.mark.parametrize(("command", "status"), ACCEPTED)
async def test_accepted_commands_are_202_and_their_events_are_in_the_log(
    api: httpx.AsyncClient,
    queueing: httpx.AsyncClient,
    command: str,
    status: ConversationStatus,
) -> None:
    api = client_in(status, api, queueing)
    cid = await in_status(api, status)
    before = await conversation(api, cid)
    response = await send(api, cid, command)
    assert response.status_code == 202, (command, status, response.text)
    body = response.json()
    assert body["status"] == "ok" and body["conversation_id"] == cid
    assert body["last_event_id"] > before["last_event_id"]
    after = await conversation(api, cid)  # read-your-writes: at once, no waiting
    assert after["last_event_id"] >= body["last_event_id"]
    target = COMMAND_TRANSITIONS[COMMANDS[command]][status]
    if target != status:
        expected = {S.STARTING, S.QUEUED, S.RUNNING} if command == "start" else {target}
        assert body["taskbus_status"] in expected, body


@pytest.mark.parametrize("answer", ["confirm", "reject"])
async def test_confirm_and_reject_are_accepted_only_while_an_action_awaits_the_answer(
    api: httpx.AsyncClient, answer: str
) -> None:
    cid = await awaiting_confirmation(api)
    response = await send(api, cid, answer)
    assert response.status_code == 202, response.text
    again = await send(api, cid, answer)  # the action is answered: nothing awaits any more
    assert again.status_code == 409, again.text
    # A rejected action leaves the agent waiting (RUNNING); a confirmed one may have finished.
    assert again.json()["reason"] in {"nothing_to_confirm", "invalid_transition"}
    if answer == "reject":
        assert again.json()["reason"] == "nothing_to_confirm"


async def test_confirm_on_an_idle_paused_conversation_wakes_it(stack: Stack) -> None:
    async with stack.client() as api:
        cid = await awaiting_confirmation(api, timeouts={"idle_seconds": 1})
        await reach(api, cid, "PAUSED")
        response = await send(api, cid, "confirm")
        assert response.status_code == 202, response.text
        await reach(api, cid, "FINISHED")


async def test_finished_stays_finished(api: httpx.AsyncClient) -> None:
    cid = await in_status(api, S.FINISHED)
    for command in ("stop", "pause", "resume"):
        response = await send(api, cid, command)
        assert response.status_code == 409, response.text
    assert (await conversation(api, cid))["taskbus_status"] == "FINISHED"


async def test_a_retried_command_gets_the_same_verdict(api: httpx.AsyncClient) -> None:
    cid = await waiting_for_user(api)
    key = {"Idempotency-Key": f"pause-{cid}"}
    first = await api.post(f"/api/conversations/{cid}/pause", headers=key)
    retried = await api.post(f"/api/conversations/{cid}/pause", headers=key)
    assert first.status_code == retried.status_code == 202, retried.text
    assert first.json() == retried.json()
    fresh = await api.post(f"/api/conversations/{cid}/pause")  # a new request is judged anew
    assert fresh.status_code == 409


async def test_the_websocket_reports_a_refused_command(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    from websockets.asyncio.client import connect

    cid = await in_status(api, S.FINISHED)
    url = f"{stack.ws_url}/api/conversations/{cid}/events?after_id=1000000"
    async with connect(url, additional_headers=stack.headers) as ws:
        await ws.send(json.dumps({"action": "pause"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT_SECONDS))
            if frame.get("kind") == "error":
                break
    assert frame["code"] == "command_refused" and frame["taskbus_status"] == "FINISHED"


# --- seed semantics --------------------------------------------------------------------------


async def events_of(client: httpx.AsyncClient, cid: str, kind: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        response = await client.get(f"/api/conversations/{cid}/events", params={"kind": kind})
        if response.status_code == 200 and response.json()["events"]:
            events: list[dict[str, Any]] = response.json()["events"]
            return events
        assert time.monotonic() < deadline, f"no {kind} in {cid}"
        await asyncio.sleep(0.2)


async def test_the_users_no_change_timeout_and_confirmation_mode_apply_to_new_conversations(
    stack: Stack,
) -> None:
    async with stack.client(DEFAULTS_KEY) as user:
        settings = {"no_change_timeout_seconds": 3, "confirmation_mode": True}
        stored = await user.put("/api/settings", json=settings)
        assert stored.status_code == 200, stored.text
        assert stored.json()["confirmation_mode"] is True
        cid = await awaiting_confirmation(user)  # asked to confirm without asking for it
        (requested,) = await events_of(user, cid, "RuntimeRequested")
        assert "no_change_seconds" in json.dumps(requested) and "3" in json.dumps(requested)
        overriding = await create(user, confirmation_mode=False, timeouts={"no_change_seconds": 5})
        await reach(user, overriding, "RUNNING", "awaiting_user_input")
        assert (await send(user, overriding, "message")).status_code == 202
        await reach(user, overriding, "FINISHED")  # no confirmation asked
        (own,) = await events_of(user, overriding, "RuntimeRequested")
        assert "5" in json.dumps(own)


async def test_a_message_while_awaiting_confirmation_rejects_and_the_agent_goes_on(
    api: httpx.AsyncClient,
) -> None:
    cid = await awaiting_confirmation(api)
    response = await api.post(
        f"/api/conversations/{cid}/message", json={"message": "Keep notes.txt, just finish."}
    )
    assert response.status_code == 202, response.text
    await reach(api, cid, "FINISHED")  # it never waits silently
    (given,) = await events_of(api, cid, "ConfirmationGiven")
    assert "Keep notes.txt, just finish." in json.dumps(given)
    await events_of(api, cid, "AgentFinishAction")  # the event store has it all now
    ran = await api.get(f"/api/conversations/{cid}/events", params={"kind": "CmdRunAction"})
    assert ran.status_code == 200 and ran.json()["events"] == []  # the action never ran


async def test_eviction_never_stops_a_higher_priority_conversation_for_a_lower_one(
    stack: Stack,
) -> None:
    async with stack.client(PRIORITY_KEY) as user:
        settings = {"max_concurrent_conversations": 1, "concurrency_policy": "evict_oldest"}
        assert (await user.put("/api/settings", json=settings)).status_code == 200
        important = await waiting_for_user(user, priority=10)
        minor = await create(user, priority=0)
        await reach(user, minor, "QUEUED")
        assert (await conversation(user, important))["taskbus_status"] == "RUNNING"
        assert (await send(user, important, "stop")).status_code == 202
        await reach(user, minor, "RUNNING")  # the slot freed: the waiting one starts
        urgent = await create(user, priority=10)
        await reach(user, urgent, "RUNNING")
        evicted = await reach(user, minor, "STOPPED")
        assert evicted["status_reason"] == "too_many_conversations"


async def test_an_error_conversation_is_cleaned_up_to_stopped(api: httpx.AsyncClient) -> None:
    cid = await create(api, repository=MISSING_REPOSITORY, timeouts={"idle_seconds": 1})
    await reach(api, cid, "ERROR")
    cleaned = await reach(api, cid, "STOPPED")
    assert cleaned["status_reason"] == "cleanup"
