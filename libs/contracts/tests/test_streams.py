"""`ensure_streams` creates what is missing, never undoes what an operator tuned, and on a
cluster makes the log survive the loss of a node; `read_batch` reads one subject's messages
in one request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender, StreamFull
from taskbus.contracts.events import Event, EventSource, ThinkAction, decode_event
from taskbus.contracts.streams import (
    DEDUPE_WINDOW_SECONDS,
    BatchReadError,
    StreamLimits,
    ensure_streams,
    read_batch,
)
from taskbus.devtools.nats_server import NatsServer, free_port


@pytest.fixture
async def js(tmp_path: Path) -> AsyncIterator[JetStreamContext]:
    """JetStream on a nats-server of the test's own, with no streams yet."""
    with NatsServer(tmp_path) as server:
        nc = await nats.connect(server.url)
        try:
            yield nc.jetstream()
        finally:
            await nc.drain()


async def test_restarting_services_keep_operator_limits_and_restore_what_taskbus_needs(
    js: JetStreamContext,
) -> None:
    await ensure_streams(js)
    created = (await js.stream_info(subjects.EVENTS_STREAM)).config
    assert created.allow_direct and created.duplicate_window == DEDUPE_WINDOW_SECONDS
    # An operator caps the log, keeps a longer dedupe window, and turns direct gets off.
    tuned = created.evolve(
        max_bytes=50_000_000, max_age=30 * 86400, duplicate_window=600, allow_direct=False
    )
    await js.update_stream(tuned)

    await ensure_streams(js)  # any service starting

    kept = (await js.stream_info(subjects.EVENTS_STREAM)).config
    assert (kept.max_bytes, kept.max_age, kept.duplicate_window) == (
        50_000_000,
        30 * 86400,
        600,
    )
    assert kept.allow_direct  # the appender's reads need it
    assert kept.num_replicas == created.num_replicas == 1
    assert kept.subjects == [subjects.ALL_EVENTS]


def cluster(root: Path) -> list[NatsServer]:
    """Three nats-servers routed into one JetStream cluster on loopback."""
    routes = [free_port() for _ in range(3)]
    return [
        NatsServer(
            root / f"n{n}",
            extra_args=[
                "--server_name",
                f"n{n}",
                "--cluster_name",
                "taskbus",
                "--cluster",
                f"nats://127.0.0.1:{routes[n]}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{port}" for port in routes),
            ],
        )
        for n in range(3)
    ]


async def test_on_a_three_node_cluster_the_log_survives_losing_a_node(tmp_path: Path) -> None:
    nodes = cluster(tmp_path)
    for node in nodes:
        node.start()
    try:
        nc = await nats.connect([node.url for node in nodes])
        js = nc.jetstream()
        for _ in range(100):  # until the cluster has elected its JetStream meta leader
            try:
                await ensure_streams(js, replicas=3)
                break
            except nats.errors.Error:  # no meta leader yet
                await asyncio.sleep(0.2)
        info = await js.stream_info(subjects.EVENTS_STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        kv = await js.key_value(subjects.CONVERSATIONS_BUCKET)
        assert (await kv.status()).stream_info.config.num_replicas == 3

        appender = EventAppender(js)
        before = await appender.append_all([think("c1", f"before {n}") for n in range(5)])
        leader = next(node for node in nodes if node_name(node) == info.cluster.leader)
        leader.kill()  # the stream's leader, the worst node to lose
        after: list[Event] = []
        for _ in range(100):  # until a new leader is elected
            try:
                after = await appender.append_all([think("c1", f"after {n}") for n in range(5)])
                break
            except nats.errors.Error:  # no stream leader yet
                await asyncio.sleep(0.2)
        assert [e.id for e in [*before, *after]] == list(range(10))
        stored = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.conversation_events("c1"))
        assert decode_event(stored.data).id == 9  # type: ignore[arg-type]
        await nc.close()
    finally:
        for node in nodes:
            node.stop()


def node_name(node: NatsServer) -> str:
    return node.extra_args[node.extra_args.index("--server_name") + 1]


def think(cid: str, text: str) -> ThinkAction:
    return ThinkAction(conversation_id=cid, source=EventSource.AGENT, thought=text)


async def test_a_full_log_refuses_the_writer_and_keeps_every_conversations_history(
    js: JetStreamContext,
) -> None:
    await ensure_streams(js)
    # The operator (the launcher's admin credential) lowers the limit of the existing log.
    await ensure_streams(js, limits=StreamLimits(events_max_bytes=8_000))
    assert (await js.stream_info(subjects.EVENTS_STREAM)).config.max_bytes == 8_000
    appender = EventAppender(js)
    appended = 0
    with pytest.raises(StreamFull, match=subjects.EVENTS_STREAM):
        for n in range(1000):
            await appender.append(think("live", f"thought {n} " + "x" * 200))
            appended += 1
    assert 10 < appended < 1000
    # Nothing was dropped to make room: the first event is still the first.
    first = await js.get_msg(subjects.EVENTS_STREAM, 1, direct=True)
    assert decode_event(first.data).id == 0
    assert (await js.stream_info(subjects.EVENTS_STREAM)).state.messages == appended

    await ensure_streams(js)  # a service starting leaves the operator's limit alone
    assert (await js.stream_info(subjects.EVENTS_STREAM)).config.max_bytes == 8_000
    # Raising the limit lets the same writer go on, with the next id.
    await ensure_streams(js, limits=StreamLimits())
    again = await appender.append(think("live", "after the operator acted"))
    assert again.id == appended


async def test_the_command_queue_is_bounded_and_dead_letters_age_out(js: JetStreamContext) -> None:
    await ensure_streams(js, limits=StreamLimits(commands_max_msgs=2))
    commands = (await js.stream_info(subjects.COMMANDS_STREAM)).config
    assert commands.max_msgs == 2 and commands.max_bytes and commands.max_bytes > 0
    for n in range(2):
        await js.publish(subjects.user_command_subject(f"C{n}"), b"{}")
    with pytest.raises(nats.js.errors.APIError, match="maximum messages"):
        await js.publish(subjects.user_command_subject("C2"), b"{}")
    dead = (await js.stream_info(subjects.DEADLETTER_STREAM)).config
    assert dead.subjects == [subjects.ALL_DEADLETTERS]
    assert dead.max_age and dead.max_bytes and dead.max_bytes > 0


async def test_a_batch_read_gives_one_subjects_messages_from_a_sequence_and_what_is_left(
    js: JetStreamContext,
) -> None:
    await ensure_streams(js)
    sequences: dict[str, list[int]] = {"a": [], "b": []}
    for n in range(12):  # two conversations' events interleaved in the stream
        cid = "ab"[n % 2]
        ack = await js.publish(subjects.event_subject(cid, "ThinkAction"), f"{cid}{n}".encode())
        sequences[cid].append(ack.seq)
    a = subjects.conversation_events("a")

    page, left = await read_batch(js, a, 1, 4)
    assert page == [(s, f"a{2 * i}".encode()) for i, s in enumerate(sequences["a"][:4])]
    assert left == 2
    rest, left = await read_batch(js, a, page[-1][0] + 1, 100)
    assert [s for s, _ in rest] == sequences["a"][4:] and left == 0
    assert await read_batch(js, a, sequences["b"][-1] + 1, 100) == ([], 0)  # past its last
    assert await read_batch(js, subjects.conversation_events("nobody"), 1, 100) == ([], 0)


async def test_a_batch_read_nobody_answers_fails_at_once_as_a_bus_error(
    js: JetStreamContext,
) -> None:
    """A stream without direct gets has no responder: an error, not a wait or an empty read,
    and a bus error (nats.errors.Error), which consumers retry instead of dead-lettering."""
    await js.add_stream(StreamConfig(name="PLAIN", subjects=["plain.>"]))
    await js.publish("plain.x", b"1")
    with pytest.raises(nats.errors.Error, match="503") as raised:
        await asyncio.wait_for(read_batch(js, "plain.>", 1, 10, stream="PLAIN"), 10)
    assert isinstance(raised.value, BatchReadError)


async def test_a_batch_reply_lost_on_the_way_is_an_error_not_a_gap(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client drops a reply that would overflow its subscription's pending bytes (a slow
    consumer) and keeps the smaller ones after it: the reader must notice the hole."""
    await ensure_streams(js)
    for payload in (b"1", b"x" * 100, b"3"):
        await js.publish(subjects.event_subject("a", "ThinkAction"), payload)
    subscribe = Client.subscribe

    async def small_queue(self: Client, subject: str, **options: Any) -> Subscription:
        return await subscribe(self, subject, **{**options, "pending_bytes_limit": 50})

    monkeypatch.setattr(Client, "subscribe", small_queue)
    with pytest.raises(BatchReadError, match="after sequence 1 was lost"):
        await read_batch(js, subjects.conversation_events("a"), 1, 100)
