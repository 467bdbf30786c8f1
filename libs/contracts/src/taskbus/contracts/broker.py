"""The FastStream broker every service consumes through, logged in as `bus.connect` logs in.

A service builds one broker with `service_broker`, declares its durable pull consumers on it
(`durable_pull`: batches, manual ack, so a message is acked only once its effect is stored), and
uses the broker's own connection (`jetstream`) for everything FastStream has no equivalent of:
the expected-sequence append loop, KV and direct gets. Every consumed and published message
passes the OpenTelemetry middleware (trace context travels in NATS headers) and the Prometheus
one (messages, sizes, durations and errors per subject, in `prometheus_client`'s registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from faststream.message.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus.provider import settings_provider_factory
from faststream.nats.response import NatsPublishCommand
from faststream.nats.security import NatsSecurity, NatsUserPassword
from faststream.nats.subscriber.usecases import (
    BatchPullStreamSubscriber,
)
from faststream.prometheus import ConsumeAttrs, MetricsSettingsProvider, PrometheusMiddleware
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StatusCode
from nats.js.api import Header as JetStreamHeader
from nats.js.errors import ServiceUnavailableError
from prometheus_client import REGISTRY, CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.bus import environment_credential, environment_tls, inbox_prefix

logger = logging.getLogger(__name__)

_FASTSTREAM_LOGGER = logging.getLogger("taskbus.faststream")
_FASTSTREAM_LOGGER.setLevel(logging.WARNING)


# What a `durable_pull` handler takes: `async def handle(batch: BatchMessage) -> None`.
BatchMessage = NatsBatchMessage

# A stop waits this long for the batch in hand to be handled before cancelling it.
GRACEFUL_STOP_SECONDS = 30.0


class ServiceBroker(NatsBroker):
    """A NatsBroker that knows the inboxes its login may read (`bus.inbox_prefix`): FastStream's
    subscribers default to `_INBOX.`, which no service user may subscribe to."""

    def __init__(self, url: str, *, inbox: str, **options: Any) -> None:
        super().__init__(url, inbox_prefix=inbox, **options)
        self.inbox = inbox


def service_broker(
    url: str,
    service: str,
    *,
    registry: CollectorRegistry = REGISTRY,
    **options: Any,
) -> ServiceBroker:
    """A broker named after `service`, logged in as `bus.connect` logs in (this process's
    credential and TLS), with the telemetry middlewares. It logs warnings and errors only
    (FastStream's per-message and per-task lines are INFO): the services log what they do."""
    credential = environment_credential()
    tls = environment_tls()
    security: NatsSecurity | None = None
    if credential is not None:
        security = NatsUserPassword(credential.user, credential.password, ssl_context=tls)
    elif tls is not None:
        security = NatsSecurity(ssl_context=tls)
    return ServiceBroker(
        url,
        inbox=inbox_prefix(credential.user) if credential is not None else "_INBOX",
        name=f"taskbus-{service}",
        security=security,
        graceful_timeout=GRACEFUL_STOP_SECONDS,
        logger=_FASTSTREAM_LOGGER,
        log_level=logging.DEBUG,
        # No fast_depends: a handler takes what its decoder made (`undecoded`, `itself`), so
        # no argument model is solved per message, which cost a third of FastStream's time
        # per batch on the hot path (a user's message).
        apply_types=False,
        middlewares=(
            NatsTelemetryMiddleware(),
            PrometheusMiddleware(
                settings_provider_factory=_bounded_labels,
                registry=registry,
                app_name=f"taskbus-{service}",
            ),
        ),
        **options,
    )


class _SubjectFamilies:
    """FastStream's NATS metrics with each subject named by its family (`subjects.family`): a
    label per conversation, reply inbox or zip stream would grow the registry without bound."""

    def __init__(self, provider: MetricsSettingsProvider[Any, Any]) -> None:
        self._provider = provider
        self.messaging_system = provider.messaging_system

    def get_consume_attrs_from_message(self, msg: StreamMessage[Any]) -> ConsumeAttrs:
        attrs = self._provider.get_consume_attrs_from_message(msg)
        attrs["destination_name"] = subjects.family(attrs["destination_name"])
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: NatsPublishCommand) -> str:
        return subjects.family(self._provider.get_publish_destination_name_from_cmd(cmd))


def _bounded_labels(msg: Any) -> _SubjectFamilies | None:
    provider = settings_provider_factory(msg)
    return None if provider is None else _SubjectFamilies(provider)


def durable_pull(
    broker: ServiceBroker,
    subject: str | Sequence[str],
    handle: Callable[[BatchMessage], Awaitable[None]],
    *,
    stream: str,
    config: ConsumerConfig,
    batch_size: int,
    expires: float,
) -> BatchPullStreamSubscriber:
    """A durable pull consumer handing `handle` batches of up to `batch_size` messages, in log
    order, undecoded: what its standing pull request (`_keep_a_pull_open`, renewed every
    `expires` seconds while idle) has brought by the time the handler is free. Nothing is
    acked for the handler: it acks, naks (with a delay), terms or keeps `in_progress` each
    message itself, through `message.raw_message`. `config.durable_name` names the consumer."""
    if not config.durable_name:  # an ephemeral consumer would start over after a restart
        raise ValueError("a durable pull consumer needs config.durable_name")
    subjects = [subject] if isinstance(subject, str) else list(subject)
    if len(subjects) > 1:  # FastStream's subject is one filter; the config carries several
        config.filter_subjects = subjects
    subscriber = broker.subscriber(
        subjects[0] if len(subjects) == 1 else "",
        stream=JStream(stream, declare=False),  # `streams.ensure_streams` declares them
        durable=config.durable_name,
        config=config,
        pull_sub=PullSub(batch_size=batch_size, timeout=expires, batch=True),
        ack_policy=AckPolicy.MANUAL,
        inbox_prefix=f"{broker.inbox}.".encode(),
    )
    assert isinstance(subscriber, BatchPullStreamSubscriber)
    subscriber(handle, decoder=itself)
    _keep_a_pull_open(subscriber, broker, stream, config.durable_name, batch_size, expires)
    return subscriber


# A standing pull asks for more once this share of what it asked for has come.
_ASK_AGAIN_SHARE = 0.5
# Past a request's expiry, how long the consumer waits for the server's word on it (a 408)
# before it takes the request as lost (a reconnect drops the server's answer) and asks anew.
_EXPIRY_GRACE_SECONDS = 1.0
_PENDING_MESSAGES = "Nats-Pending-Messages"


def _keep_a_pull_open(
    subscriber: BatchPullStreamSubscriber,
    broker: ServiceBroker,
    stream: str,
    durable: str,
    batch_size: int,
    expires: float,
) -> None:
    """Replace FastStream's batch loop, which sends a pull request per batch and waits until the
    batch is full or its timeout has passed (so a lone message waits the timeout out), with a
    standing pull request, as nats.go's `Consume` keeps: up to `batch_size` messages are asked
    for at a time, each delivered the moment it is stored, and more are asked for once half
    have come. Whatever has come when the handler is free is its next batch. So a lone message
    is handed over as it comes, a flow of messages costs a pull request per half batch (not one
    per message or two), and an idle consumer one per `expires`. The handler and FastStream's
    middlewares are as for any batch (`consume`).

    What is still asked for is counted: a message takes one off; a request that expires says
    in its 408 how many of it were not delivered; any other status (409: the consumer was
    deleted or changed leader, too many waiting requests) may have dropped every request, so
    they are all taken as gone. Asking for too many is harmless (they come as they are
    stored); for too few only stalls until the next expiry, which the count then corrects."""

    async def consume_pull() -> None:
        nc = connection(broker)
        next_messages = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        inbox = await nc.subscribe(nc.new_inbox())
        asked = 0  # messages asked for and neither delivered nor reported undelivered
        heard = time.monotonic()  # when the server last answered a request
        try:
            while subscriber.running:
                if time.monotonic() - heard > expires + _EXPIRY_GRACE_SECONDS:
                    asked, heard = 0, time.monotonic()  # unanswered: the requests are lost
                if asked <= batch_size * _ASK_AGAIN_SHARE:
                    more = batch_size - asked
                    request = {"batch": more, "expires": int(expires * 1e9)}
                    try:
                        await nc.publish(next_messages, json.dumps(request).encode(), inbox.subject)
                    except (ConnectionClosedError, ServiceUnavailableError):
                        await asyncio.sleep(expires)  # a reconnect brings the connection back
                        continue
                    asked += more
                try:
                    first = await inbox.next_msg(timeout=expires + _EXPIRY_GRACE_SECONDS)
                except TimeoutError:
                    continue
                arrived = [first]
                while inbox.pending_msgs and len(arrived) < batch_size:
                    arrived.append(await inbox.next_msg(timeout=None))
                heard = time.monotonic()
                messages = []
                for msg in arrived:
                    headers = msg.headers or {}
                    status = headers.get(JetStreamHeader.STATUS)
                    if status is None:
                        messages.append(msg)
                        asked -= 1
                    elif status == StatusCode.REQUEST_TIMEOUT:
                        asked -= int(headers.get(_PENDING_MESSAGES, 0))
                    elif status != StatusCode.CONTROL_MESSAGE:
                        asked = 0
                asked = max(asked, 0)
                if messages and subscriber.running:
                    await subscriber.consume(messages)
        finally:
            with contextlib.suppress(Exception):
                await inbox.unsubscribe()

    subscriber._consume_pull = consume_pull  # type: ignore[method-assign]


async def renew_while_held(held: Callable[[], Iterable[Msg]], every: float) -> None:
    """Tell JetStream every `every` seconds (a fraction of the ack wait) that the messages
    `held()` names are still being worked on, until cancelled: a handler slower than the ack
    wait (a long command, a write that keeps failing) would otherwise see them redelivered to
    another instance, or to this one, while still at work on them. A renewal the bus does not
    take (it is down) is let go: the next one may be, and each caller handles a redelivered
    message once all the same."""
    while True:
        await asyncio.sleep(every)
        for message in list(held()):
            try:
                await message.in_progress()
            except Exception as error:
                logger.debug("in_progress for %s failed: %r", message.subject, error)


async def undecoded(message: StreamMessage[Any]) -> Any:
    """A FastStream decoder that leaves the body as it came: every service decodes with msgspec
    itself and dead-letters what fails, where FastStream's decoding by the content-type header
    would fail a whole batch on one forged header."""
    return message.body


async def itself(message: StreamMessage[Any]) -> Any:
    """A FastStream decoder that hands the handler the message itself, undecoded: for a
    handler that needs more than the body (a batch's raw messages to ack, a subject)."""
    return message


# FastStream adds headers to a reply (correlation id, trace context) and NATS counts headers
# against max_payload: a reply's body must leave them this much room.
REPLY_HEADER_ROOM = 4096


def reply_limit(broker: NatsBroker) -> int:
    """The largest reply body a responder on `broker` may send."""
    return int(connection(broker).max_payload) - REPLY_HEADER_ROOM


def connection(broker: NatsBroker) -> Client:
    """The broker's NATS connection, once `connect` or `start` has run."""
    client: Client = broker.config.connection_state.connection
    return client


def jetstream(broker: NatsBroker) -> JetStreamContext:
    """The broker's JetStream context, once `connect` or `start` has run."""
    js: JetStreamContext = broker.config.connection_state.stream
    return js
