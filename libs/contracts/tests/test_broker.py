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
    # fast_depends runs what it cannot await in a worker thread: a GIL hand-over per message.
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
            timeout=0.2,
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
            timeout=0.2,
        )


async def test_sparse_traffic_into_large_batches_loses_no_batch_to_a_fetch_timeout(
    tmp_path: Path,
) -> None:
    """A batch's deadline passing between nats-py's two pull requests must not kill the loop
    and strand what it had gathered until ack_wait (30 s here, far beyond the test's wait)."""
    handled: set[str] = set()
    with NatsServer(tmp_path) as server:
        broker = service_broker(server.url, "test", registry=CollectorRegistry())

        async def handle(message: BatchMessage) -> None:
            for raw in message.raw_message:
                handled.add(raw.subject)
                await raw.ack()

        consume_all_events(
            broker,
            handle,
            config=ConsumerConfig(
                durable_name="sparse", ack_policy=AckPolicy.EXPLICIT, ack_wait=30
            ),
            batch_size=256,
            timeout=0.02,
        )

        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js)
        await broker.start()
        try:
            sent = {subjects.event_subject(f"c{n}", "Kind") for n in range(300)}
            for subject in sorted(sent):
                await js.publish(subject, b"{}")
                await asyncio.sleep(0.003)
            for _ in range(100):
                if handled == sent:
                    break
                await asyncio.sleep(0.05)
            assert len(handled) == len(sent)
        finally:
            await broker.stop()


async def test_a_consumer_that_does_not_wait_to_fill_hands_over_a_lone_message_at_once(
    tmp_path: Path,
) -> None:
    """Not `wait_to_fill`: a lone message is handed over as it comes, not after the poll (which
    FastStream's own loop would wait out, 2 s here); what gathers while the handler is busy
    comes next, in order, many at a time; an idle consumer sends a pull request or two per poll."""
    poll = 2.0
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
            batch_size=100,
            timeout=poll,
            wait_to_fill=False,
        )
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js)
        pulls: list[float] = []

        async def pulled(msg: Msg) -> None:
            pulls.append(time.monotonic())

        tap = await nats.connect(server.url)
        await tap.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.taker", cb=pulled)
        await broker.start()
        try:
            await asyncio.sleep(2 * poll)
            assert 1 <= len(pulls) <= 6, f"{len(pulls)} pull requests in two idle polls"

            started = time.monotonic()
            await js.publish(subjects.event_subject("c00", "Kind"), b"{}")
            await asyncio.wait_for(handed.wait(), 10)
            took = time.monotonic() - started
            # Below the wait of a "what else is there" fetch too (0.5 s), which must not run.
            assert took < poll / 8, f"a lone message waited {took:.2f} s"

            backlog = [subjects.event_subject(f"c{n:02d}", "Kind") for n in range(1, 31)]
            for subject in backlog:
                await js.publish(subject, b"{}")
            release.set()
            for _ in range(200):
                if sum(len(batch) for batch in batches) == 31:
                    break
                await asyncio.sleep(0.05)
            assert [subject for batch in batches[1:] for subject in batch] == backlog
            assert len(batches[1]) > 1, "the backlog came one message at a time"
        finally:
            await broker.stop()
            await tap.close()
