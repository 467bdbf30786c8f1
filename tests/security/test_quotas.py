"""Fair admission, attacked through the public API of a real stack.

Issue 8 found: `max_concurrent_conversations` (up to 1000) and `priority` (up to 100) are
user-settable and beat the operator's global cap, and nothing limited the queue. Here the
operator allows 2 running conversations, 1 per user, priority at most 0 and 2 queued per user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from ..conftest import Stack, running_stack

pytestmark = pytest.mark.slow

BOB_KEY = "tb_bob_quota_test_key"
# Every conversation runs one long command, so it holds its slot for the whole test.
HOLD_SLOT = {
    "steps": [
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": "sleep 600"}}]},
    ]
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("quotas"),
        HOLD_SLOT,
        TASKBUS_API_KEYS=f"{BOB_KEY}=bob",
        TASKBUS_MAX_RUNNING="2",
        TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT="1",
        TASKBUS_MAX_PRIORITY="0",
        TASKBUS_MAX_QUEUED_CONVERSATIONS="2",
    ) as running:
        yield running


@pytest.fixture
async def greedy(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The local user, who asks for everything."""
    async with stack.client() as client:
        yield client


@pytest.fixture
async def bob(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with stack.client(BOB_KEY) as client:
        yield client


async def create(client: httpx.AsyncClient, **spec: Any) -> httpx.Response:
    return await client.post("/api/conversations", json={"initial_user_msg": "Hold on.", **spec})


async def status_of(client: httpx.AsyncClient, cid: str) -> str:
    status: str = (await client.get(f"/api/conversations/{cid}")).json()["taskbus_status"]
    return status


async def admission_decided(client: httpx.AsyncClient, cid: str) -> bool:
    """Whether the log holds admission's decision (the conversation's first status)."""
    events = await client.get(
        f"/api/conversations/{cid}/events", params={"kind": "ConversationStatusChanged"}
    )
    return bool(events.json()["events"])


async def settled_status(client: httpx.AsyncClient, cid: str) -> str:
    """The status once admission has decided (QUEUED stays; starting moves to RUNNING).

    Session-manager appends ConversationCreated and its first status one by one, and create
    answers once the former is visible: in between, the summary says QUEUED ("waiting for
    admission") for a conversation that may be started a moment later. So QUEUED counts only
    once the log holds a status.
    """
    deadline = time.monotonic() + 60
    while True:
        decided = await admission_decided(client, cid)
        status = await status_of(client, cid)
        if decided and status in ("QUEUED", "RUNNING", "ERROR"):
            return status
        assert time.monotonic() < deadline, f"{cid} still {status}"
        await asyncio.sleep(0.3)


async def test_a_greedy_user_cannot_take_another_users_slot_and_its_queue_is_bounded(
    greedy: httpx.AsyncClient, bob: httpx.AsyncClient
) -> None:
    put = await greedy.put(
        "/api/settings", json={"max_concurrent_conversations": 1000, "concurrency_policy": "queue"}
    )
    assert put.status_code == 200, put.text

    mine = []
    for _ in range(3):
        response = await create(greedy, priority=100)
        assert response.status_code == 201, response.text
        mine.append(response.json()["conversation_id"])
    assert [await settled_status(greedy, cid) for cid in mine] == ["RUNNING", "QUEUED", "QUEUED"]

    # The queue limit: a fourth is refused, truthfully, and leaves nothing behind.
    refused = await create(greedy, priority=100)
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "urn:taskbus:problem:queue-full"
    assert "queued conversations" in problem["detail"]
    listed = (await greedy.get("/api/conversations", params={"limit": 100})).json()["results"]
    assert len(listed) == 3

    # The other user still gets the free global slot at once: 1000 and priority 100 bought
    # the greedy user nothing past the operator's maxima.
    theirs = await create(bob)
    assert theirs.status_code == 201, theirs.text
    assert await settled_status(bob, theirs.json()["conversation_id"]) == "RUNNING"
    assert [await status_of(greedy, cid) for cid in mine[1:]] == ["QUEUED", "QUEUED"]

    # The log records the priority that applied, not the one asked for.
    events = await greedy.get(
        f"/api/conversations/{mine[0]}/events", params={"kind": "ConversationCreated"}
    )
    (created,) = events.json()["events"]
    assert created["spec"]["priority"] == 0, created
