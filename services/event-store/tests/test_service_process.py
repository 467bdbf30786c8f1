"""`python -m taskbus.event_store` as a real process: it answers over NATS, keeps its data across
restarts and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    Event,
    EventSource,
    MessageAction,
)
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.queries import (
    ConversationReply,
    EventPage,
    GetConversation,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.app import run_rebuild
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.rebuild import EventStoreRunning
from taskbus.event_store.settings import EventStoreSettings
from taskbus.event_store.sql import Statement
from taskbus.event_store.synthetic import users_history

# How long a (re)started service may take to answer with what the log holds: a restart on a
# busy two-core machine imports chDB and loads every partition first.
SETTLE_SECONDS = 90.0

_reply_decoder = msgspec.json.Decoder(ConversationReply | EventPage | QueryError)


class EventStoreProcess:
    def __init__(
        self, nats_url: str, data_dir: Path, consumer_name: str, instance_id: str = ""
    ) -> None:
        self.data_dir = data_dir
        self.consumer_name = consumer_name
        self.env = {
            **os.environ,
            "TASKBUS_NATS_URL": nats_url,
            "TASKBUS_CLICKHOUSE_DSN": f"chdb://{data_dir}",
            "TASKBUS_CONSUMER_NAME": consumer_name,
            "TASKBUS_INSTANCE_ID": instance_id,
            "TASKBUS_FLUSH_INTERVAL_MS": "20",
            "TASKBUS_BATCH_SIZE": "200",
        }
        self.log = data_dir.parent / f"event-store{instance_id and '-'}{instance_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "taskbus.event_store"], env=self.env, stderr=log
            )

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def service(nats_url: str, tmp_path: Path) -> Iterator[EventStoreProcess]:
    process = EventStoreProcess(
        nats_url, tmp_path / "clickhouse", f"event_store_process_{uuid.uuid4().hex[:8]}"
    )
    yield process
    process.kill()


async def ask(nc: Client, query: GetConversation | SearchEvents) -> object:
    """A query's answer, waited for 15 s: a just restarted service on a loaded CI worker took
    longer than 5 s for its first (two fresh-clone runs), reading back from disk the chDB pages
    it released at start (`clickhouse.release_start_up_pages`)."""
    msg = await nc.request(
        subjects.query_subject(query.subject_name), msgspec.json.encode(query), timeout=15
    )
    return _reply_decoder.decode(msg.data)


def is_deleted(events: list[Event]) -> bool:
    return any(isinstance(event, ConversationDeleted) for event in events)


async def purged(nc: Client, js: JetStreamContext, user_id: str, cid: str) -> None:
    """Poll until a deleted conversation is gone from the service's answers and from the log
    (here no other consumer of the log has to see the deletion first)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.NoRespondersError):
            reply = await ask(nc, GetConversation(user_id=user_id, conversation_id=cid))
            if isinstance(reply, QueryError) and reply.status == 404:
                try:
                    await js.get_last_msg(subjects.EVENTS_STREAM, subjects.conversation_events(cid))
                except nats.js.errors.NotFoundError:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the deleted conversation {cid} was never purged")


async def conversation_once_at(
    nc: Client, user_id: str, cid: str, last_event_id: int
) -> ConversationReply:
    """Poll until the service answers with the conversation projected up to `last_event_id`."""
    query = GetConversation(user_id=user_id, conversation_id=cid)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        try:
            reply = await ask(nc, query)
        except nats.errors.NoRespondersError:
            reply = None  # still starting
        if (
            isinstance(reply, ConversationReply)
            and reply.conversation.last_event_id >= last_event_id
        ):
            return reply
        await asyncio.sleep(0.05)
    raise AssertionError(f"the service never projected {cid} up to event {last_event_id}")


async def test_service_process_answers_queries_and_survives_a_restart(
    service: EventStoreProcess, nc: Client, js: JetStreamContext
) -> None:
    user_id, cid = f"carol-{uuid.uuid4().hex[:8]}", f"proc-{uuid.uuid4().hex[:10]}"
    appender = EventAppender(js)
    await appender.append_all(
        [
            ConversationCreated(
                conversation_id=cid,
                source=EventSource.USER,
                user_id=user_id,
                title="Run as a process",
                spec=ConversationSpec(repository="octo/proc"),
            ),
            ConversationStatusChanged(
                conversation_id=cid,
                source=EventSource.ENVIRONMENT,
                status=ConversationStatus.RUNNING,
            ),
            MessageAction(conversation_id=cid, source=EventSource.USER, content="hello"),
        ]
    )
    service.start()
    reply = await conversation_once_at(nc, user_id, cid, 2)
    assert reply.conversation.status is ConversationStatus.RUNNING
    assert reply.conversation.repository == "octo/proc"
    page = await ask(nc, SearchEvents(user_id=user_id, conversation_id=cid, query="HELLO"))
    assert isinstance(page, EventPage) and len(page.events) == 1
    foreign = await ask(nc, GetConversation(user_id="mallory", conversation_id=cid))
    assert isinstance(foreign, QueryError) and foreign.status == 404
    # A rebuild under another consumer name sees no leases or durables of this service: the
    # chDB path's lock alone refuses it, before chDB would have died on it.
    assert service.process is not None
    other = {**service.env, "TASKBUS_CONSUMER_NAME": "other_name"}
    with pytest.raises(EventStoreRunning) as refused:
        await run_rebuild(settings_from_env(EventStoreSettings, other))
    assert f"its chDB data path is held open (PID: {service.process.pid})" in str(refused.value)
    assert service.stop() == 0

    # Restarted on the same data: the projection is still there and the consumer resumes.
    await appender.append(
        ConversationStatusChanged(
            conversation_id=cid, source=EventSource.ENVIRONMENT, status=ConversationStatus.FINISHED
        )
    )
    service.start()
    reply = await conversation_once_at(nc, user_id, cid, 3)
    assert reply.conversation.status is ConversationStatus.FINISHED
    assert reply.conversation.event_count == 4
    assert service.stop() == 0
    assert "event-store stopped" in service.log.read_text()


async def stored_ids(data_dir: Path) -> dict[str, list[int]]:
    """Event ids per conversation as ClickHouse holds them (the service must be stopped: a chDB
    path has one owner)."""
    clickhouse = await ClickHouse.connect(f"chdb://{data_dir}", query_connections=1)
    try:
        rows = await clickhouse.select(
            Statement(
                "SELECT conversation_id, arraySort(groupArray(id)) FROM events FINAL"
                " GROUP BY conversation_id",
                {},
            )
        )
    finally:
        await clickhouse.close()
    return {cid: list(ids) for cid, ids in rows}


async def rebuild_with_the_cli(service: EventStoreProcess) -> tuple[int, str]:
    """`python -m taskbus.event_store rebuild` on the service's data: exit code and stderr."""
    rebuild = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbus.event_store",
        "rebuild",
        env=service.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(rebuild.communicate(), timeout=120)
    assert rebuild.returncode is not None
    assert (b"rebuilt" in out) == (rebuild.returncode == 0)
    return rebuild.returncode, err.decode()


async def acked_count(js: JetStreamContext, service: EventStoreProcess) -> int:
    """How many events the service has acked, over its partitions' durables (each counts the
    messages it delivered and had acked in a row; before any redelivery, all it acked)."""
    total = 0
    for partition in range(PARTITIONS):
        durable = subjects.event_store_durable(partition, service.consumer_name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
            total += (info.ack_floor.consumer_seq or 0) if info.ack_floor is not None else 0
    return total


async def test_kill_9_mid_ingest_then_restart_leaves_clickhouse_equal_to_the_log(
    service: EventStoreProcess, nc: Client, js: JetStreamContext
) -> None:
    """Thousands of events appended while the service is killed -9 mid-ingest and restarted."""
    tag = uuid.uuid4().hex[:6]
    planned = users_history(
        random.Random(9),
        [f"k{n}{tag}" for n in range(2)],
        15,
        datetime(2025, 5, 1, tzinfo=UTC),
        max_steps=60,
        id_prefix=f"kill{tag}",
    )
    appender = EventAppender(js)
    service.start()
    first, *others = planned
    created = first[0]
    assert isinstance(created, ConversationCreated)
    first = await appender.append_all(first)
    await conversation_once_at(nc, created.user_id, created.conversation_id, 0)  # it is up
    acked_before = await acked_count(js, service)
    appending = asyncio.gather(*(appender.append_all(events) for events in others))
    for _ in range(4000):
        acked = await acked_count(js, service)
        if acked > acked_before:
            break
        await asyncio.sleep(0.005)
    service.kill()  # SIGKILL once the service has acked some of the new events
    appended = [first, *await appending]
    logged = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
    assert acked_before < acked < logged, "no kill mid-ingest: nothing acked yet, or all"
    service.start()
    for events in appended:
        created = events[0]
        assert isinstance(created, ConversationCreated)
        if is_deleted(events):  # deleted means gone: purged from the log and ClickHouse
            await purged(nc, js, created.user_id, created.conversation_id)
        else:
            await conversation_once_at(nc, created.user_id, created.conversation_id, events[-1].id)
    # A rebuild is refused while the service runs, and changes nothing.
    refused, err = await rebuild_with_the_cli(service)
    assert refused != 0 and "rebuild refused: the event-store is consuming" in err, err
    assert service.stop() == 0

    logged = {
        events[0].conversation_id: None if is_deleted(events) else [e.id for e in events]
        for events in appended
    }
    assert sum(len(ids or []) for ids in logged.values()) > 2000
    assert None in logged.values(), "no deleted conversation in the history"
    stored = await stored_ids(service.data_dir)
    assert {cid: stored.get(cid) for cid in logged} == logged

    # The CLI rebuild on the same data, the service stopped, gives the same content.
    returncode, err = await rebuild_with_the_cli(service)
    assert returncode == 0, err[-2000:]
    stored = await stored_ids(service.data_dir)
    assert {cid: stored.get(cid) for cid in logged} == logged
