"""One task end to end through the public REST/WS API against the real stack."""

from __future__ import annotations

import docker
import docker.errors
import httpx
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.devtools.bus_auth import ADMIN

from .conftest import Stack
from .public_api import (
    events_until_final,
    next_event,
    open_events_ws,
    rest_events_when_projected,
)

pytestmark = pytest.mark.slow

TASK = "Plan with the task tracker, create hello.txt, write a README.md, then finish."


async def test_task_runs_to_finished_and_ws_equals_rest(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": TASK})
    assert created.status_code == 201, created.text
    conversation_id = created.json()["conversation_id"]

    # Read-your-writes: the conversation is visible right after the POST.
    fetched = await api.get(f"/api/conversations/{conversation_id}")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["conversation_id"] == conversation_id

    async with open_events_ws(stack, conversation_id, -1) as ws:
        ws_events = await events_until_final(ws)

    kinds = [e["kind"] for e in ws_events]
    assert [e["id"] for e in ws_events] == list(range(len(ws_events)))
    statuses = [e["status"] for e in ws_events if e["kind"] == "ConversationStatusChanged"]
    assert "RUNNING" in statuses and statuses[-1] == "FINISHED", statuses

    plans = [e for e in ws_events if e["kind"] == "TaskTrackingAction"]
    seen_statuses = {item["status"] for plan in plans for item in plan["args"]["task_list"]}
    assert seen_statuses == {"todo", "in_progress", "done"}
    assert "TaskTrackingObservation" in kinds

    runs = {e["id"]: e for e in ws_events if e["kind"] == "CmdRunAction"}
    outputs = [e for e in ws_events if e["kind"] == "CmdOutputObservation"]
    assert runs and outputs
    assert all(o["cause"] in runs for o in outputs)
    assert any(o["extras"]["exit_code"] == 0 for o in outputs)
    assert "FileEditObservation" in kinds or "FileWriteObservation" in kinds
    assert "AgentFinishAction" in kinds
    assert any(e["kind"] == "LLMMetrics" and e["cost"] > 0 for e in ws_events)

    # The projection serves the very same events, id for id.
    rest_events = await rest_events_when_projected(api, conversation_id, len(ws_events))
    assert rest_events[: len(ws_events)] == ws_events

    final = (await api.get(f"/api/conversations/{conversation_id}")).json()
    assert final["taskbus_status"] == "FINISHED"


async def test_an_idle_finished_conversation_gives_its_sandbox_back(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post(
        "/api/conversations", json={"initial_user_msg": TASK, "timeouts": {"idle_seconds": 1}}
    )
    assert created.status_code == 201, created.text
    conversation_id = created.json()["conversation_id"]
    async with open_events_ws(stack, conversation_id, -1) as ws:
        events = await events_until_final(ws)
        assert events[-1]["status"] == "FINISHED"
        while not (
            (event := await next_event(ws))["kind"] == "RuntimeStatusChanged"
            and event["status"] == "stopped"
        ):
            assert event["kind"] in ("RuntimeControlRequested", "CmdOutputChunk"), event
    assert event["reason"] == "idle"
    (ready,) = [e for e in events if e["kind"] == "RuntimeStatusChanged" and e["status"] == "ready"]
    if ready["backend"] == "docker":
        engine = docker.from_env()
        try:
            with pytest.raises(docker.errors.NotFound):
                engine.containers.get(ready["sandbox_id"])
        finally:
            engine.close()
    final = (await api.get(f"/api/conversations/{conversation_id}")).json()
    assert final["taskbus_status"] == "FINISHED"  # the outcome stays


async def test_ws_reconnect_after_event_k_gets_exactly_the_rest(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": TASK})
    conversation_id = created.json()["conversation_id"]

    async with open_events_ws(stack, conversation_id, -1) as ws:
        first_part = [await next_event(ws) for _ in range(6)]
    k = first_part[-1]["id"]
    assert [e["id"] for e in first_part] == list(range(6))

    async with open_events_ws(stack, conversation_id, k) as ws:
        rest = await events_until_final(ws)
    assert [e["id"] for e in rest] == list(range(k + 1, k + 1 + len(rest)))

    async with open_events_ws(stack, conversation_id, -1) as ws:
        everything = await events_until_final(ws)
    assert first_part + rest == everything


async def _log_sequences(stack: Stack) -> tuple[int, int]:
    nc = await connect(stack.nats_url, "e2e-test", stack.bus_credential(ADMIN))
    js = nc.jetstream()
    events = await js.stream_info(subjects.EVENTS_STREAM)
    commands = await js.stream_info(subjects.COMMANDS_STREAM)
    await nc.drain()
    return events.state.last_seq, commands.state.last_seq


def _assert_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"]


async def test_bad_input_gets_problem_json_and_appends_nothing(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": TASK})
    conversation_id = created.json()["conversation_id"]
    async with open_events_ws(stack, conversation_id, -1) as ws:
        await events_until_final(ws)  # quiet log from here on
    before = await _log_sequences(stack)

    malformed = await api.post(
        "/api/conversations",
        content=b'{"initial_user_msg": "x",',
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= malformed.status_code < 500
    _assert_problem(malformed, malformed.status_code)
    _assert_problem(
        await api.post("/api/conversations", json={"initial_user_msg": "x", "colour": "red"}), 422
    )
    for limit in (0, 101):
        _assert_problem(
            await api.get(f"/api/conversations/{conversation_id}/events", params={"limit": limit}),
            422,
        )
    unknown = "0" * 32
    _assert_problem(await api.get(f"/api/conversations/{unknown}"), 404)
    _assert_problem(await api.get(f"/api/conversations/{unknown}/events"), 404)
    _assert_problem(
        await api.post(f"/api/conversations/{unknown}/message", json={"message": "hi"}), 404
    )
    _assert_problem(
        await api.post(f"/api/conversations/{conversation_id}/message", json={"msg": "hi"}), 422
    )
    unauthenticated = await api.get(
        f"/api/conversations/{conversation_id}", headers={"Authorization": "Bearer wrong"}
    )
    _assert_problem(unauthenticated, 401)

    assert await _log_sequences(stack) == before


async def test_analytics_endpoints_agree_with_the_event_history(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": TASK})
    conversation_id = created.json()["conversation_id"]
    async with open_events_ws(stack, conversation_id, -1) as ws:
        events = await events_until_final(ws)
    await rest_events_when_projected(api, conversation_id, len(events))

    cost = await api.get("/api/analytics/cost", params={"group_by": "conversation"})
    assert cost.status_code == 200, cost.text
    bucket = next(b for b in cost.json()["buckets"] if b["key"] == conversation_id)
    metrics = [e for e in events if e["kind"] == "LLMMetrics"]
    assert bucket["llm_calls"] == len(metrics)
    assert bucket["cost"] == pytest.approx(sum(m["cost"] for m in metrics))
    assert bucket["prompt_tokens"] == sum(m["prompt_tokens"] for m in metrics)
    assert bucket["completion_tokens"] == sum(m["completion_tokens"] for m in metrics)

    kinds = await api.get("/api/analytics/event-kinds", params={"conversation_id": conversation_id})
    assert kinds.status_code == 200, kinds.text
    expected: dict[str, int] = {}
    for event in events:
        expected[event["kind"]] = expected.get(event["kind"], 0) + 1
    assert {k["kind"]: k["events"] for k in kinds.json()["kinds"]} == expected

    durations = await api.get("/api/analytics/durations")
    assert durations.status_code == 200, durations.text
    finished = next(o for o in durations.json()["outcomes"] if o["status"] == "FINISHED")
    assert finished["conversations"] >= 1 and finished["max_seconds"] > 0
