"""Delete means gone: after DELETE every read is a 404, the conversation's events leave the log
and ClickHouse, its workspace is removed, a rebuild agrees, and the id never comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js.errors import NotFoundError
from websockets.exceptions import InvalidStatus

from taskbus.contracts import subjects
from taskbus.contracts.bus import CREDENTIALS_FILE_ENV
from taskbus.contracts.bus import connect as bus_connect
from taskbus.contracts.commands import CreateConversation, command_subject, encode_command
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.queries import EventPage, QueryError, SearchEvents
from taskbus.contracts.specs import ConversationSpec
from taskbus.devtools.bus_auth import ADMIN, credential_file
from taskbus.devtools.launcher import LOCAL_USER

from .conftest import Stack, running_stack
from .public_api import events_until_final, open_events_ws

pytestmark = pytest.mark.slow

TASK = "Create hello.txt with a greeting, then finish."
PURGE_SECONDS = 60
SILENCE_SECONDS = 3.0

# Run in a subprocess: chDB opens one data path per process, and the stack's is its own.
_COUNT_ROWS = """
import sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
for cid in sys.argv[2:]:
    counts = [client.query(
        f"SELECT count() FROM {table} FINAL WHERE conversation_id = {{cid:String}}",
        parameters={"cid": cid},
    ).result_rows[0][0] for table in ("events", "conversations")]
    print(*counts)
"""


@pytest.fixture(scope="module")
def own_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, Callable[[], None]]]:
    """This module's own stack and a way to stop it: the last test opens its chDB path."""
    with contextlib.ExitStack() as exits:
        yield exits.enter_context(running_stack(tmp_path_factory.mktemp("delete"))), exits.close


@pytest.fixture(scope="module")
def stack(own_stack: tuple[Stack, Callable[[], None]]) -> Stack:
    return own_stack[0]


class Deleted(msgspec.Struct, kw_only=True):
    deleted: str
    kept: str
    kept_events: list[dict[str, Any]]
    idempotency_key: str


@pytest.fixture(scope="module")
async def deleted(stack: Stack) -> AsyncIterator[Deleted]:
    """Two finished conversations, one of them deleted (not yet necessarily purged)."""
    async with stack.client() as api:
        key = uuid.uuid4().hex
        ids = []
        for headers in ({"Idempotency-Key": key}, {}):
            created = await api.post(
                "/api/conversations", json={"initial_user_msg": TASK}, headers=headers
            )
            assert created.status_code == 201, created.text
            ids.append(created.json()["conversation_id"])
        finals = []
        for cid in ids:
            async with open_events_ws(stack, cid, -1) as ws:
                finals.append(await events_until_final(ws))
        assert [events[-1]["status"] for events in finals] == ["FINISHED", "FINISHED"]
        workspace = stack.data_dir / "workspaces" / ids[0]
        assert workspace.is_dir()
        response = await api.delete(f"/api/conversations/{ids[0]}")
        assert response.is_success, response.text
        yield Deleted(deleted=ids[0], kept=ids[1], kept_events=finals[1], idempotency_key=key)


async def admin_js(stack: Stack) -> Any:
    return await bus_connect(stack.nats_url, "test-delete", stack.bus_credential(ADMIN))


async def stored_subjects(stack: Stack, conversation_id: str) -> dict[str, int]:
    """The log's subjects of the conversation with their message counts (admin credential)."""
    nc = await admin_js(stack)
    try:
        info = await nc.jetstream().stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subjects.conversation_events(conversation_id)
        )
        return dict(info.state.subjects or {})
    finally:
        await nc.drain()


async def messages_on(stack: Stack, conversation_id: str) -> int:
    """What a fresh consumer on `taskbus.events.<cid>.>` would be given."""
    nc = await admin_js(stack)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subjects.conversation_events(conversation_id), stream=subjects.EVENTS_STREAM
        )
        try:
            info = await sub.consumer_info()
            try:
                await js.get_last_msg(
                    subjects.EVENTS_STREAM, subjects.conversation_events(conversation_id)
                )
                has_last = 1
            except NotFoundError:
                has_last = 0
            return int(info.num_pending) + has_last
        finally:
            await sub.unsubscribe()
    finally:
        await nc.drain()


async def wait_until_purged(stack: Stack, conversation_id: str) -> None:
    deadline = time.monotonic() + PURGE_SECONDS
    while await stored_subjects(stack, conversation_id):
        assert time.monotonic() < deadline, "the deleted conversation was never purged"
        await asyncio.sleep(0.5)


def count_rows(dsn: str, *conversation_ids: str) -> list[tuple[int, int]]:
    """(events, conversations) rows of each conversation in the chDB at `dsn`."""
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_ROWS, dsn, *conversation_ids],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [(int(a), int(b)) for a, b in (line.split() for line in out.splitlines())]


async def test_every_read_of_a_deleted_conversation_is_404(
    stack: Stack, api: httpx.AsyncClient, deleted: Deleted
) -> None:
    base = f"/api/conversations/{deleted.deleted}"
    for path in (base, f"{base}/events", f"{base}/events/0", f"{base}/events/1"):
        response = await api.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    with pytest.raises(InvalidStatus) as refused:
        async with open_events_ws(stack, deleted.deleted, -1):
            pass
    assert refused.value.response.status_code == 404
    listed = []
    for params in ({}, {"status": "ARCHIVED"}, {"limit": 100}):
        page = await api.get("/api/conversations", params=params)
        assert page.status_code == 200, page.text
        listed += [c["conversation_id"] for c in page.json()["results"]]
    assert deleted.deleted not in listed
    assert deleted.kept in listed
    # Acting on it is a 404 too, and a second DELETE changes nothing.
    assert (await api.post(f"{base}/message", json={"message": "hi"})).status_code == 404
    assert (await api.delete(base)).status_code == 404


async def test_its_events_leave_the_log_and_clickhouse_and_its_workspace_goes(
    stack: Stack, api: httpx.AsyncClient, deleted: Deleted
) -> None:
    await wait_until_purged(stack, deleted.deleted)
    assert await messages_on(stack, deleted.deleted) == 0
    assert not (stack.data_dir / "workspaces" / deleted.deleted).exists()
    assert not (stack.data_dir / "workspaces" / ".home" / deleted.deleted).exists()
    # ClickHouse, through event-store's own query API (bypassing the gateway's 404) ... The
    # purge empties the log first and ClickHouse right after (so a crash in between leaves the
    # purge on record), so ClickHouse may still be at it a moment after the log is empty.
    nc = await admin_js(stack)
    try:
        for cid, expected in ((deleted.deleted, 0), (deleted.kept, len(deleted.kept_events))):
            deadline = time.monotonic() + PURGE_SECONDS
            while True:
                reply = await nc.request(
                    subjects.query_subject(SearchEvents.subject_name),
                    msgspec.json.encode(
                        SearchEvents(user_id=LOCAL_USER, conversation_id=cid, limit=100)
                    ),
                    timeout=10,
                )
                page = msgspec.json.decode(reply.data, type=EventPage | QueryError)
                found = len(page.events) if isinstance(page, EventPage) else 0
                if found == expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert found == expected, (cid, page)
    finally:
        await nc.drain()
    # ... and through the public analytics, which count rows by kind.
    for cid, present in ((deleted.deleted, False), (deleted.kept, True)):
        kinds = await api.get("/api/analytics/event-kinds", params={"conversation_id": cid})
        assert kinds.status_code == 200, kinds.text
        assert bool(kinds.json()["kinds"]) is present, kinds.text
    # The other conversation is untouched: every event still served and stored.
    assert sum((await stored_subjects(stack, deleted.kept)).values()) >= len(deleted.kept_events)
    kept = await api.get(f"/api/conversations/{deleted.kept}/events", params={"limit": 100})
    assert kept.json()["events"][: len(deleted.kept_events)] == deleted.kept_events


async def test_the_id_never_comes_back(
    stack: Stack, api: httpx.AsyncClient, deleted: Deleted
) -> None:
    await wait_until_purged(stack, deleted.deleted)
    again = await api.post(
        "/api/conversations",
        json={"initial_user_msg": TASK},
        headers={"Idempotency-Key": deleted.idempotency_key},
    )
    assert again.status_code == 409, again.text
    assert again.json()["type"].endswith("conversation-deleted")
    # A CreateConversation straight on the bus (as a redelivered command would come) is
    # ignored by session-manager too; a fresh one sent after it shows the queue moved on.
    fresh = uuid.uuid4().hex
    nc = await admin_js(stack)
    try:
        js = nc.jetstream()
        for cid in (deleted.deleted, fresh):
            command = CreateConversation(
                user_id=LOCAL_USER, conversation_id=cid, spec=ConversationSpec(title="again")
            )
            await js.publish(
                command_subject(command),
                encode_command(command),
                stream=subjects.COMMANDS_STREAM,
            )
    finally:
        await nc.drain()
    deadline = time.monotonic() + 30
    while not await stored_subjects(stack, fresh):
        assert time.monotonic() < deadline, "session-manager took no command"
        await asyncio.sleep(0.25)
    await asyncio.sleep(SILENCE_SECONDS)
    assert await stored_subjects(stack, deleted.deleted) == {}
    assert (await api.get(f"/api/conversations/{deleted.deleted}")).status_code == 404


async def test_a_rebuild_agrees(stack: Stack, deleted: Deleted, tmp_path: Path) -> None:
    """`python -m taskbus.event_store rebuild` into fresh tables (the service keeps its own)."""
    await wait_until_purged(stack, deleted.deleted)
    dsn = f"chdb://{tmp_path / 'rebuilt'}"
    consumer = f"rebuild_{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        TASKBUS_NATS_URL=stack.nats_url,
        TASKBUS_CLICKHOUSE_DSN=dsn,
        TASKBUS_CONSUMER_NAME=consumer,
        **{CREDENTIALS_FILE_ENV: str(credential_file(stack.data_dir / "bus", ADMIN))},
    )
    rebuilt = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "taskbus.event_store", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    nc = await admin_js(stack)
    try:
        for partition in range(PARTITIONS):  # the rebuild's own durables, one per partition
            with contextlib.suppress(NotFoundError):
                await nc.jetstream().delete_consumer(
                    subjects.EVENTS_STREAM, subjects.event_store_durable(partition, consumer)
                )
    finally:
        await nc.drain()
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    gone, kept = await asyncio.to_thread(count_rows, dsn, deleted.deleted, deleted.kept)
    assert gone == (0, 0)
    assert kept[0] >= len(deleted.kept_events) and kept[1] == 1


async def test_no_row_is_left_in_the_stacks_own_clickhouse(
    own_stack: tuple[Stack, Callable[[], None]], deleted: Deleted
) -> None:
    """Last: stops the module's stack, then opens the chDB path the event-store owned."""
    stack, stop = own_stack
    await wait_until_purged(stack, deleted.deleted)
    await asyncio.to_thread(stop)
    dsn = f"chdb://{stack.data_dir / 'clickhouse'}"
    gone, kept = await asyncio.to_thread(count_rows, dsn, deleted.deleted, deleted.kept)
    assert gone == (0, 0)
    assert kept[0] >= len(deleted.kept_events) and kept[1] == 1
