"""Task dependencies through the public API on the whole stack: a chain A -> B -> C runs in
order with each agent told what the one before it came to; a failure of A fails B and C with
`dependency_failed`; unknown ids, other users' ids and cycles are refused at submission."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from taskbus.devtools.launcher import LOCAL_USER
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.gateway.conversations import conversation_id_for

from .conftest import Stack, running_stack
from .public_api import all_events_via_rest

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
OUTCOME = "Built the parser; it lives in parser.py."
# A runs one command (proposed, in confirmation mode: it waits for our confirm), then finishes.
SCRIPT = {
    "steps": [
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": "echo working"}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"message": OUTCOME}}]},
    ]
}
MALLORY_KEY = "tb_mallory_dependencies_test_key"
WAIT_SECONDS = 90


@pytest.fixture(scope="module")
def llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(SCRIPT) as model:
        yield model


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, llm: ScriptedLLM) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("dependencies"),
        TASKBUS_LLM_MODEL="openai/scripted",
        TASKBUS_LLM_BASE_URL=llm.url,
        TASKBUS_LLM_API_KEY="scripted",
        TASKBUS_API_KEYS=f"{MALLORY_KEY}=mallory",
    ) as running:
        yield running


async def create(api: httpx.AsyncClient, task: str, **spec: Any) -> str:
    response = await api.post("/api/conversations", json={"initial_user_msg": task, **spec})
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]
    return cid


async def conversation(api: httpx.AsyncClient, cid: str) -> dict[str, Any]:
    response = await api.get(f"/api/conversations/{cid}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def reach(api: httpx.AsyncClient, cid: str, status: str, agent_state: str = "") -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        info = await conversation(api, cid)
        if info["taskbus_status"] == status and agent_state in ("", info["agent_state"]):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{cid} never reached {status} {agent_state}: {info}")


async def reason_reached(api: httpx.AsyncClient, cid: str, reason: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_SECONDS
    while (info := await conversation(api, cid))["status_reason"] != reason:
        assert time.monotonic() < deadline, f"{cid} never gave the reason {reason}: {info}"
        await asyncio.sleep(0.2)
    return info


async def awaiting_confirmation(api: httpx.AsyncClient, task: str, **spec: Any) -> str:
    cid = await create(api, task, confirmation_mode=True, **spec)
    await reach(api, cid, "RUNNING", "awaiting_user_confirmation")
    return cid


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def statuses(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["status"], e["reason"]) for e in events if e["kind"] == "ConversationStatusChanged"]


def resolved(events: list[dict[str, Any]]) -> dict[str, Any]:
    [record] = [e for e in events if e["kind"] == "DependenciesResolved"]
    return record


def requests_of(llm: ScriptedLLM, task: str) -> list[dict[str, Any]]:
    """The requests the scripted model received for the conversation whose task is `task`."""
    return [r.body for r in llm.player.requests if task in str(r.body["messages"][1:])]


async def test_a_chain_runs_in_order_and_each_agent_reads_the_outcome_before_it(
    api: httpx.AsyncClient, llm: ScriptedLLM
) -> None:
    task_a, task_b, task_c = (f"task {name} {uuid.uuid4().hex}" for name in "ABC")
    a = await awaiting_confirmation(api, task_a)
    b = await create(api, task_b, depends_on=[a])
    c = await create(api, task_c, depends_on=[b])
    for dependent, dependency in ((b, a), (c, b)):
        # The create answers once the conversation is recorded; the session-manager's reason
        # for holding it follows in its own event.
        info = await reason_reached(api, dependent, "waiting_for_dependencies")
        assert info["taskbus_status"] == "QUEUED"
        assert info["depends_on"] == [dependency]
    await asyncio.sleep(1)
    assert not requests_of(llm, task_b) and not requests_of(llm, task_c)

    assert (await api.post(f"/api/conversations/{a}/confirm")).status_code == 202
    await reach(api, c, "FINISHED")

    events = {cid: await all_events_via_rest(api, cid) for cid in (a, b, c)}
    finished_at = {
        cid: next(e["timestamp"] for e in evs if e.get("status") == "FINISHED")
        for cid, evs in events.items()
    }
    for dependency, dependent, task in ((a, b, task_b), (b, c, task_c)):
        record = resolved(events[dependent])
        assert record["failed"] is False
        [outcome] = record["outcomes"]
        assert outcome["conversation_id"] == dependency
        assert outcome["status"] == "FINISHED" and outcome["final_message"] == OUTCOME
        # Queued, then started only once the dependency had finished, outcome recorded first.
        assert statuses(events[dependent])[:2] == [
            ("QUEUED", "waiting_for_dependencies"),
            ("STARTING", ""),
        ]
        starting = next(e for e in events[dependent] if e.get("status") == "STARTING")
        assert record["id"] < starting["id"]
        assert starting["timestamp"] >= finished_at[dependency]
        # What the dependent's agent was sent names the dependency and its outcome.
        sent = requests_of(llm, task)
        assert sent
        for body in sent:
            system = body["messages"][0]["content"]
            assert f"(conversation {dependency}): FINISHED" in system and OUTCOME in system

    # The list (the event store's table) knows the dependencies too.
    listed = (await api.get("/api/conversations", params={"limit": 100})).json()["results"]
    assert {info["conversation_id"]: info["depends_on"] for info in listed}[c] == [b]


async def test_a_failure_of_a_fails_b_and_c_with_dependency_failed(
    api: httpx.AsyncClient, llm: ScriptedLLM
) -> None:
    task_a, task_b, task_c = (f"task {name} {uuid.uuid4().hex}" for name in "ABC")
    # One agent step allowed: after its command A ends in ERROR (max_iterations).
    a = await awaiting_confirmation(api, task_a, max_iterations=1)
    b = await create(api, task_b, depends_on=[a])
    c = await create(api, task_c, depends_on=[b])
    await reach(api, c, "QUEUED")

    assert (await api.post(f"/api/conversations/{a}/confirm")).status_code == 202
    await reach(api, a, "ERROR")
    await reach(api, c, "ERROR")
    for dependency, dependent, task in ((a, b, task_b), (b, c, task_c)):
        # Appends for different conversations run concurrently: c's failure may be visible a
        # moment before b's, so each is read once it shows.
        await reach(api, dependent, "ERROR")
        info = await conversation(api, dependent)
        assert info["status_reason"] == "dependency_failed"
        events = await all_events_via_rest(api, dependent)
        record = resolved(events)
        assert record["failed"] is True
        assert [(o["conversation_id"], o["status"]) for o in record["outcomes"]] == [
            (dependency, "ERROR")
        ]
        assert statuses(events) == [
            ("QUEUED", "waiting_for_dependencies"),
            ("ERROR", "dependency_failed"),
        ]
        assert "RuntimeRequested" not in kinds(events)  # never given a sandbox
        assert not requests_of(llm, task)


async def test_a_deleted_dependency_fails_its_dependent(api: httpx.AsyncClient) -> None:
    a = await awaiting_confirmation(api, f"task {uuid.uuid4().hex}")
    b = await create(api, f"task {uuid.uuid4().hex}", depends_on=[a])
    assert (await api.delete(f"/api/conversations/{a}")).status_code == 202
    await reach(api, b, "ERROR")
    assert (await conversation(api, b))["status_reason"] == "dependency_failed"


def assert_refused(response: httpx.Response, kind: str, dependency: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem["type"] == f"urn:taskbus:problem:{kind}"
    assert problem["dependency"] == dependency
    assert dependency in problem["detail"]


async def test_unknown_foreign_and_cyclic_dependencies_are_refused_at_submission(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    mine = await create(api, "a conversation of mine")
    unknown = uuid.uuid4().hex
    refused = await api.post(
        "/api/conversations", json={"initial_user_msg": "x", "depends_on": [mine, unknown]}
    )
    assert_refused(refused, "unknown-dependency", unknown)

    # Another user's conversation, by its real id: refused exactly as an unknown one.
    async with stack.client(MALLORY_KEY) as mallory:
        refused = await mallory.post(
            "/api/conversations", json={"initial_user_msg": "x", "depends_on": [mine]}
        )
        assert_refused(refused, "unknown-dependency", mine)
        assert mine not in str((await mallory.get("/api/conversations")).json())

    # A deleted conversation is gone: nothing may depend on it any more.
    gone = await create(api, "soon deleted")
    assert (await api.delete(f"/api/conversations/{gone}")).status_code == 202
    refused = await api.post(
        "/api/conversations", json={"initial_user_msg": "x", "depends_on": [gone]}
    )
    assert_refused(refused, "unknown-dependency", gone)

    # The id comes from the Idempotency-Key, so a client can name the conversation it creates:
    # depending on itself is the cycle a client can build.
    key = uuid.uuid4().hex
    itself = conversation_id_for(LOCAL_USER, key)
    refused = await api.post(
        "/api/conversations",
        json={"initial_user_msg": "x", "depends_on": [mine, itself]},
        headers={"Idempotency-Key": key},
    )
    assert_refused(refused, "dependency-cycle", itself)
    assert refused.json()["cycle"] == [itself, itself]
    assert (await api.get(f"/api/conversations/{itself}")).status_code == 404

    # Malformed ids and too many are refused by the body's own limits.
    for bad in (["../../etc"], ["x" * 65], [mine] * 33, "not-a-list"):
        response = await api.post(
            "/api/conversations", json={"initial_user_msg": "x", "depends_on": bad}
        )
        assert response.status_code == 422, (bad, response.text)
