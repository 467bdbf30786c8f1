"""Read-your-writes through the public API while the event store's ingest is slowed down.

Whatever a client has seen (the create response, a GET, a WebSocket frame) must be in what
`/events` and a single-event GET answer next, and `has_more` must never say "no more" while the
log holds more. The ingest pauses before every batch (`TASKBUS_INGEST_DELAY_MS`, a test hook),
so without the event store's read barrier the first /events after a create answers 404 and a
read after FINISHED misses the last events.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from .conftest import Stack, running_stack
from .public_api import FINAL, next_event, open_events_ws

pytestmark = pytest.mark.slow

ROUNDS = 60
IN_FLIGHT = 10
# Longer than the ingest's batch interval (100 ms), so reads regularly arrive before the ingest.
INGEST_DELAY_MS = 400
# A short task: one command, then finish (every conversation plays the same script).
SCRIPT = {
    "steps": [
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": "echo read-check"}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]},
    ]
}
# Events appended after FINISHED (e.g. the sandbox's teardown) arrive within this on the WS.
TRAILING_SECONDS = 1.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("read-your-writes"),
        SCRIPT,
        TASKBUS_INGEST_DELAY_MS=str(INGEST_DELAY_MS),
        TASKBUS_CREATE_BURST=str(ROUNDS),
        TASKBUS_CREATE_RATE_PER_MINUTE="6000",
        TASKBUS_MAX_RUNNING=str(IN_FLIGHT),
        TASKBUS_MAX_CONCURRENT_CONVERSATIONS=str(IN_FLIGHT),
        TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT=str(IN_FLIGHT),
        TASKBUS_CONCURRENCY_POLICY="queue",
    ) as running:
        yield running


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=4 * IN_FLIGHT)
    async with stack.client(limits=limits) as client:
        yield client


# A read the barrier could not serve within its bound is a 503 "store-catching-up" with
# Retry-After, never a short answer: a client retries it, as this one does (on a busy machine the
# slowed ingest can fall more than the barrier's bound behind).
CATCHING_UP_RETRIES = 20


async def read(api: httpx.AsyncClient, url: str, **params: int) -> httpx.Response:
    """GET `url`, honouring the event store's "catching up" answer and nothing else."""
    for _ in range(CATCHING_UP_RETRIES):
        response = await api.get(url, params=params)
        if response.status_code != 503:
            return response
        assert response.json()["type"] == "urn:taskbus:problem:store-catching-up", response.text
        await asyncio.sleep(int(response.headers["Retry-After"]))
    raise AssertionError(f"{url} still catching up after {CATCHING_UP_RETRIES} retries")


async def events_page(
    api: httpx.AsyncClient, cid: str, start_id: int = 0, limit: int = 100
) -> dict[str, Any]:
    response = await read(api, f"/api/conversations/{cid}/events", start_id=start_id, limit=limit)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def all_events(api: httpx.AsyncClient, cid: str, limit: int) -> list[dict[str, Any]]:
    """Every page in order; checks each page's cursor and that ids are dense from 0."""
    events: list[dict[str, Any]] = []
    start_id = 0
    while True:
        page = await events_page(api, cid, start_id, limit)
        events += page["events"]
        assert [e["id"] for e in events] == list(range(len(events)))
        if not page["has_more"]:
            assert page["next_start_id"] is None
            return events
        assert len(page["events"]) == limit and page["next_start_id"] == events[-1]["id"] + 1
        start_id = page["next_start_id"]


def ids(events: list[dict[str, Any]]) -> list[int]:
    return [e["id"] for e in events]


async def one_round(stack: Stack, api: httpx.AsyncClient, rng: random.Random) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": "Say it, then stop."})
    assert created.status_code == 201, created.text
    cid = created.json()["conversation_id"]
    seen = created.json()["conversation"]["last_event_id"]

    # Right after the create: the events it has shown, at once (not 404), from 0 on.
    page = await events_page(api, cid)
    assert ids(page["events"])[: seen + 1] == list(range(seen + 1)), (seen, page)
    listed = await read(api, "/api/conversations", limit=4 * IN_FLIGHT)
    assert listed.status_code == 200, listed.text
    assert cid in [c["conversation_id"] for c in listed.json()["results"]]

    ws_events: list[dict[str, Any]] = []
    async with open_events_ws(stack, cid, -1) as ws:
        probe_at = rng.randrange(3, 8)
        while not (
            ws_events
            and ws_events[-1]["kind"] == "ConversationStatusChanged"
            and ws_events[-1]["status"] in FINAL
        ):
            ws_events.append(await next_event(ws))
            if len(ws_events) == probe_at:
                # An id just seen on the WebSocket: its GET succeeds at once, and /events has
                # everything up to it.
                frame = ws_events[-1]
                single = await read(api, f"/api/conversations/{cid}/events/{frame['id']}")
                assert single.status_code == 200, single.text
                assert single.json() == frame
                page = await events_page(api, cid)
                assert page["events"][: len(ws_events)] == ws_events
        assert ws_events[-1]["status"] == "FINISHED", ws_events[-1]

        # FINISHED seen on the WebSocket, and the conversation seen by a GET (which may show a
        # later status, e.g. once its sandbox is given back): /events, all pages, has it all.
        fetched = await read(api, f"/api/conversations/{cid}")
        assert fetched.status_code == 200 and fetched.json()["status"] in FINAL, fetched.text
        seen = fetched.json()["last_event_id"]
        rest = await all_events(api, cid, limit=rng.choice([3, 7, 100]))
        assert len(rest) >= max(len(ws_events), seen + 1), (len(rest), len(ws_events), seen)
        # Anything REST has beyond the WebSocket so far came after FINISHED: the WebSocket
        # delivers it too, and then the two are the same, id for id.
        deadline = time.monotonic() + 30
        while len(ws_events) < len(rest):
            assert time.monotonic() < deadline, "the WebSocket never sent what /events has"
            ws_events.append(await next_event(ws))
        with_trailing = await trailing(ws, ws_events)
    assert rest == ws_events[: len(rest)]
    # A last read, all the log's trailing events seen: it is the WebSocket's history exactly.
    assert await all_events(api, cid, limit=100) == with_trailing


async def trailing(ws: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`events` plus whatever the WebSocket sends within TRAILING_SECONDS of quiet."""
    events = list(events)
    while True:
        try:
            events.append(await asyncio.wait_for(next_event(ws), TRAILING_SECONDS))
        except TimeoutError:
            return events


async def test_reads_see_every_event_seen_anywhere_with_a_slow_ingest(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    rng = random.Random(9)
    slots = asyncio.Semaphore(IN_FLIGHT)
    started = time.monotonic()

    async def round_in_a_slot(n: int) -> None:
        async with slots:
            await one_round(stack, api, random.Random(rng.random() + n))

    await asyncio.gather(*(round_in_a_slot(n) for n in range(ROUNDS)))
    print(f"{ROUNDS} rounds in {time.monotonic() - started:.1f} s")


async def test_a_single_event_beyond_the_log_is_404_and_an_event_just_written_is_there(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/conversations", json={"initial_user_msg": "Say it, then stop."})
    assert created.status_code == 201, created.text
    cid = created.json()["conversation_id"]
    seen = created.json()["conversation"]["last_event_id"]
    single = await api.get(f"/api/conversations/{cid}/events/{seen}")
    assert single.status_code == 200, single.text
    assert single.json()["id"] == seen
    beyond = await api.get(f"/api/conversations/{cid}/events/100000")
    assert beyond.status_code == 404, beyond.text
    assert beyond.headers["content-type"].startswith("application/problem+json")
