"""The event log on a 3-node cluster in containers: the stream leader is cut off from the network
while many writers append, then rejoined. No acked event is lost, none is stored twice, every
conversation's ids stay dense, and the rejoined node catches up with the others."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from taskbus.contracts import subjects
from taskbus.contracts.appender import AppendConflict, EventAppender
from taskbus.contracts.events import EventSource, ThinkAction
from taskbus.contracts.streams import ensure_streams

from .conftest import Node

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

CONVERSATIONS = 16
WRITERS_PER_CONVERSATION = 3  # one per client connection, so appends to a conversation race
T = TypeVar("T")


async def connect(nodes: list[Node]) -> Client:
    """A client trying `nodes` in this order, that notices a dead server within ~3 s (ping)
    and fails over to the next at once."""
    return await nats.connect(
        servers=[node.url for node in nodes],
        dont_randomize=True,
        ping_interval=1,
        max_outstanding_pings=2,
        connect_timeout=1,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
    )


async def eventually(attempt: Callable[[], Awaitable[T | None]], what: str, seconds: float) -> T:
    """The first non-None result of `attempt`, retried through the cluster's transient errors."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            result = await attempt()
        except nats.errors.Error:
            result = None
        if result is not None:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


async def stream_leader(js: JetStreamContext) -> str | None:
    info = await js.stream_info(subjects.EVENTS_STREAM)
    return info.cluster.leader if info.cluster is not None else None


class Writers:
    """Appends ThinkActions to many conversations from several connections at once, each
    append retried (the same event) through timeouts and failovers until it is acked: what a
    service does. `acked` is what the writers were told is stored, with its id."""

    def __init__(self, appenders: list[EventAppender]) -> None:
        self.appenders = appenders
        self.acked: dict[str, list[ThinkAction]] = {}
        self.retries = 0
        self.last_ack = 0.0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        conversations = [uuid.uuid4().hex for _ in range(CONVERSATIONS)]
        await asyncio.gather(
            *(
                self._write(cid, writer, self.appenders[writer % len(self.appenders)])
                for cid, writer in itertools.product(conversations, range(WRITERS_PER_CONVERSATION))
            )
        )

    def stop(self) -> None:
        self._stopping.set()

    async def _write(self, cid: str, writer: int, appender: EventAppender) -> None:
        for n in itertools.count():
            if self._stopping.is_set():
                return
            event = ThinkAction(
                conversation_id=cid, source=EventSource.AGENT, thought=f"w{writer}-{n}"
            )
            while True:
                try:
                    stored = await appender.append(event)
                    break
                except (nats.errors.Error, AppendConflict):
                    self.retries += 1
                    await asyncio.sleep(0.05)
            self.acked.setdefault(cid, []).append(stored)
            self.last_ack = time.monotonic()


async def stored_events(js: JetStreamContext) -> dict[str, list[ThinkAction]]:
    """Every event in the log, per conversation in log order."""
    # The meta, stream and consumer leaders may still be settling after the rejoin: each read
    # is retried through "no responders" (a CI run met one on a fetch).
    info = await eventually(lambda: js.stream_info(subjects.EVENTS_STREAM), "the log's info", 30)
    last = info.state.last_seq
    reader = await eventually(
        lambda: js.pull_subscribe(
            subjects.ALL_EVENTS,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),
        ),
        "a consumer of the log",
        30,
    )
    stored: dict[str, list[ThinkAction]] = {}
    seen = 0
    while seen < last:
        for message in await eventually(lambda: reader.fetch(500, timeout=5), "a page", 30):
            event = msgspec.json.decode(message.data, type=ThinkAction)
            stored.setdefault(event.conversation_id, []).append(event)
            seen = message.metadata.sequence.stream
    await reader.unsubscribe()
    return stored


async def test_a_stream_leader_cut_off_and_rejoined_loses_and_duplicates_no_event(
    nats_cluster: list[Node],
) -> None:
    admin = await connect(nats_cluster)
    js = admin.jetstream(timeout=2)

    async def create_streams() -> bool:
        await ensure_streams(js, replicas=3)
        return True

    await eventually(create_streams, "streams created (once there is a meta leader)", 30)
    old_leader = await eventually(lambda: stream_leader(js), "a stream leader", 30)
    cut = next(node for node in nats_cluster if node.name == old_leader)
    others = [node for node in nats_cluster if node is not cut]
    # Writer connections start on different nodes: one is on the leader when it is cut off.
    connections = [await connect(nats_cluster[i:] + nats_cluster[:i]) for i in range(3)]
    writers = Writers([EventAppender(c.jetstream(timeout=2)) for c in connections])
    writing = asyncio.create_task(writers.run())
    observer = await connect(others)
    observer_js = observer.jetstream(timeout=1)
    try:
        await asyncio.sleep(1.0)
        at_cut = (await observer_js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        cut_at = time.monotonic()
        await asyncio.to_thread(cut.disconnect)
        new_leader = await eventually(
            lambda: _other_leader(observer_js, old_leader), "a new stream leader", 30
        )
        elected = time.monotonic() - cut_at
        await eventually(
            lambda: _true_or_none(writers.last_ack > cut_at + elected), "writes resume", 30
        )
        resumed = writers.last_ack - cut_at
        await asyncio.sleep(1.0)  # writing under the new leader while the old one is away
        # The new leader counts the cut-off node as a replica that is not current.
        info = await observer_js.stream_info(subjects.EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.replicas is not None
        (away,) = [peer for peer in info.cluster.replicas if peer.name == cut.name]
        assert not away.current, away
        rejoin_at = time.monotonic()
        await asyncio.to_thread(cut.reconnect)
        await asyncio.sleep(1.0)  # writing with all three nodes back
    finally:
        writers.stop()
        await writing
    last = (await observer_js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    await eventually(
        lambda: _true_or_none(cut.events_state(subjects.EVENTS_STREAM)["last_seq"] == last),
        "the rejoined node catches up",
        30,
    )
    caught_up = time.monotonic() - rejoin_at

    stored = await stored_events(observer_js)
    assert sorted(stored) == sorted(writers.acked)
    for cid, events in stored.items():
        assert [e.id for e in events] == list(range(len(events))), f"{cid}: ids not dense"
        texts = [e.thought for e in events]
        assert len(set(texts)) == len(texts), f"{cid}: an event stored twice"
        assert sorted(events, key=lambda e: e.id) == sorted(
            writers.acked[cid], key=lambda e: e.id
        ), f"{cid}: the log and the acks differ"
    states = [node.events_state(subjects.EVENTS_STREAM) for node in nats_cluster]
    assert {(s["messages"], s["last_seq"]) for s in states} == {(last, last)}
    appended = sum(len(events) for events in stored.values())
    print(
        f"\ncut {old_leader} (stream leader); {new_leader} elected after {elected:.1f} s, "
        f"writes resumed after {resumed:.1f} s; {cut.name} caught up {last - at_cut}"
        f"+ messages {caught_up:.1f} s after rejoining; {appended} events, "
        f"{writers.retries} retried appends"
    )
    for client in [admin, observer, *connections]:
        await client.close()


async def _other_leader(js: JetStreamContext, old: str) -> str | None:
    leader = await stream_leader(js)
    return leader if leader not in (None, old) else None


async def _true_or_none(condition: bool) -> bool | None:
    return True if condition else None
