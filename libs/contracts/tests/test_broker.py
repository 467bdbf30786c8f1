"""The shared FastStream consumer: batches in log order, nothing acked behind the handler's back,
the telemetry middlewares on the path, and `last_message` for "the latest event of"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.broker import (
    BatchMessage,
    ServiceBroker,
    durable_pull,
    jetstream,
    service_broker,
)
from taskbus.contracts.streams import ensure_streams, last_message
from taskbus.devtools.nats_server import NatsServer

Handler = Callable[[BatchMessage], Awaitable[None]]


def consume_all_events(broker: ServiceBroker, handle: Handler, **options: Any) -> None:
    """A durable pull consumer of every event (`options`: durable_pull's)."""
    durable_pull(broker, subjects.ALL_EVENTS, handle, stream=subjects.EVENTS_STREAM, **options)


async def test_a_durable_pull_hands_batches_in_order_and_redelivers_what_was_not_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    seen: list[str] = []
    delivered_twice = asyncio.Event()
    # Nothing per message runs in a worker thread (fast_depends did, for a synchronous
    # dependency): a GIL hand-over per message.
    in_threads: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(func: Callable[..., object], *args: object, **options: Any) -> object:
        in_threads.append(func)
        return await run_sync(func, *args, **options)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    with NatsServer(tmp_path) as server:
        broker = service_broker(server.url, "test", registry=registry)

        async def handle(message: BatchMessage) -> None:
            for raw in message.raw_message:
                if raw.metadata.num_delivered > 1:
                    delivered_twice.set()
                    assert raw.subject.endswith(".skipped")
                seen.append(raw.subject)
                if not raw.subject.endswith(".skipped"):
                    await raw.ack()

        consume_all_events(
            broker,
            handle,
            config=ConsumerConfig(
                durable_name="broker_test",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=1,
            ),
            batch_size=8,
            expires=0.2,
        )
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js)
        for n in range(20):
            kind = "skipped" if n == 5 else "Kind"
            await js.publish(subjects.event_subject(f"c{n:02d}", kind), b"{}")
        await broker.start()
        try:
            await asyncio.wait_for(delivered_twice.wait(), 10)
            first_pass = seen[:20]
            assert first_pass == [
                subjects.event_subject(f"c{n:02d}", "skipped" if n == 5 else "Kind")
                for n in range(20)
            ]
            # The one the handler left unacked came back; the acked ones did not.
            assert set(seen[20:]) == {subjects.event_subject("c05", "skipped")}
            last = await last_message(js, subjects.conversation_events("c19"))
            assert last is not None and last.subject == subjects.event_subject("c19", "Kind")
            assert await last_message(js, subjects.conversation_events("nobody")) is None
            assert in_threads == []  # the handler got its batch on the event loop
        finally:
            await broker.stop()
    received = registry.get_sample_value(
        "faststream_received_messages_total",
        {"app_name": "taskbus-test", "broker": "nats", "handler": "taskbus.events.*.*.Kind"},
    )
    assert received is not None and received >= 19
    assert (
        not [  # one label per subject family, never one per conversation
            sample
            for metric in registry.collect()
            for sample in metric.samples
            if "c05" in sample.labels.get("handler", "")
        ]
    )


async def handle_nothing(message: BatchMessage) -> None:
    raise AssertionError("never consumed")


def test_a_consumer_needs_a_durable_name() -> None:
    broker = service_broker("nats://127.0.0.1:1", "test", registry=CollectorRegistry())
    with pytest.raises(ValueError, match="durable"):
        durable_pull(
            broker,
            subjects.ALL_EVENTS,
            handle_nothing,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
            batch_size=1,
            expires=0.2,
        )


async def test_a_consumer_keeps_one_pull_request_open(
    tmp_path: Path,
) -> None:
    """A lone message is handed over as it comes, not after the request's expiry (which
    FastStream's own loop would wait out, 2 s here); what gathers while the handler is busy
    comes next, in order, many at a time; a flow of messages costs a pull request per half
    batch, not one per message; an idle consumer renews its request once per poll."""
    poll = 2.0
    batch_size = 10
    batches: list[list[str]] = []
    handed = asyncio.Event()
    release = asyncio.Event()
    with NatsServer(tmp_path) as server:
        broker = service_broker(server.url, "test", registry=CollectorRegistry())

        async def handle(message: BatchMessage) -> None:
            batches.append([raw.subject for raw in message.raw_message])
            handed.set()
            await release.wait()
            for raw in message.raw_message:
                await raw.ack()

        consume_all_events(
            broker,
            handle,
            config=ConsumerConfig(durable_name="taker", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
            batch_size=batch_size,
            expires=poll,
        )
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js)
        pulls: list[float] = []

        async def pulled(msg: Msg) -> None:
            pulls.append(time.monotonic())

        async def handled(count: int) -> None:
            for _ in range(200):
                if sum(len(batch) for batch in batches) == count:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"{sum(len(b) for b in batches)} of {count} handled")

        tap = await nats.connect(server.url)
        await tap.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.taker", cb=pulled)
        await broker.start()
        try:
            await asyncio.sleep(2.5 * poll)
            assert 2 <= len(pulls) <= 3, f"{len(pulls)} pull requests in two and a half polls"

            started = time.monotonic()
            await js.publish(subjects.event_subject("c00", "Kind"), b"{}")
            await asyncio.wait_for(handed.wait(), 10)
            took = time.monotonic() - started
            assert took < poll / 8, f"a lone message waited {took:.2f} s"

            backlog = [subjects.event_subject(f"c{n:02d}", "Kind") for n in range(1, 31)]
            for subject in backlog:
                await js.publish(subject, b"{}")
            release.set()
            await handled(31)
            assert [subject for batch in batches[1:] for subject in batch] == backlog
            assert len(batches[1]) > 1, "the backlog came one message at a time"

            pulls.clear()
            flow = [subjects.event_subject(f"f{n:03d}", "Kind") for n in range(100)]
            for subject in flow:
                await js.publish(subject, b"{}")
                await asyncio.sleep(0.005)  # each stored apart from the next
            await handled(131)
            assert [subject for batch in batches for subject in batch][31:] == flow
            # Fetching one by one would send a request per message (100).
            most = len(flow) // (batch_size // 2) + 2
            assert len(pulls) <= most, f"{len(pulls)} pull requests for {len(flow)} messages"
        finally:
            await broker.stop()
            await tap.close()


async def test_a_standing_pull_asks_again_after_the_server_lost_its_requests(
    tmp_path: Path,
) -> None:
    """A server killed and started again has forgotten the pull requests waiting on it, and
    never answers them: the consumer takes them as lost after their expiry and asks again, so
    a message stored after the restart is handled, not stranded until the consumer restarts."""
    poll = 1.0
    handled: list[str] = []
    with NatsServer(tmp_path) as server:
        broker = service_broker(server.url, "test", registry=CollectorRegistry())

        async def handle(message: BatchMessage) -> None:
            for raw in message.raw_message:
                handled.append(raw.subject)
                await raw.ack()

        consume_all_events(
            broker,
            handle,
            config=ConsumerConfig(durable_name="kept", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
            batch_size=8,
            expires=poll,
        )
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js)
        await broker.start()
        try:
            await js.publish(subjects.event_subject("before", "Kind"), b"{}")
            for _ in range(100):
                if handled:
                    break
                await asyncio.sleep(0.05)
            server.kill()  # no last word (a 409) on the requests it held
            server.start()
            subject = subjects.event_subject("after", "Kind")
            for _ in range(100):  # once the broker's connection is back; stored once
                try:
                    await js.publish(subject, b"{}", timeout=0.5, headers={"Nats-Msg-Id": "after"})
                    break
                except (nats.errors.Error, TimeoutError):
                    await asyncio.sleep(0.1)
            for _ in range(200):
                if subject in handled:
                    break
                await asyncio.sleep(0.05)
            assert handled == [subjects.event_subject("before", "Kind"), subject]
        finally:
            await broker.stop()


async def test_a_stopped_consumers_pull_request_catches_nothing_from_the_next_holder(
    tmp_path: Path,
) -> None:
    """A hand-over: the consumer that stopped leaves its standing request (8 messages, 5 s) on
    the server; the server skips it, since no one reads its inbox, so the next holder of the
    durable gets every message as it is stored, not after the ack wait (30 s here)."""
    taken: list[tuple[str, int]] = []
    with NatsServer(tmp_path) as server:

        def holder(name: str) -> ServiceBroker:
            broker = service_broker(server.url, name, registry=CollectorRegistry())

            async def handle(message: BatchMessage) -> None:
                for raw in message.raw_message:
                    taken.append((name, raw.metadata.num_delivered))
                    await raw.ack()

            consume_all_events(
                broker,
                handle,
                config=ConsumerConfig(
                    durable_name="moved", ack_policy=AckPolicy.EXPLICIT, ack_wait=30
                ),
                batch_size=8,
                expires=5.0,
            )
            return broker

        old = holder("old")
        await old.connect()
        await ensure_streams(jetstream(old))
        await old.start()
        await asyncio.sleep(0.5)  # its request is on the server
        await old.stop()
        new = holder("new")
        await new.connect()
        await new.start()
        try:
            for n in range(5):
                await jetstream(new).publish(subjects.event_subject(f"c{n}", "Kind"), b"{}")
            for _ in range(100):
                if len(taken) == 5:
                    break
                await asyncio.sleep(0.05)
            assert taken == [("new", 1)] * 5
        finally:
            await new.stop()
