"""The FastStream broker every service consumes through, logged in as `bus.connect` logs in.

A service builds one broker with `service_broker`, declares its durable pull consumers on it
(`durable_pull`: batches, manual ack, so a message is acked only once its effect is stored), and
uses the broker's own connection (`jetstream`) for everything FastStream has no equivalent of:
the expected-sequence append loop, KV and direct gets. Every consumed and published message
passes the OpenTelemetry middleware (trace context travels in NATS headers) and the Prometheus
one (messages, sizes, durations and errors per subject, in `prometheus_client`'s registry).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from faststream import Context
from faststream.message.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus.provider import settings_provider_factory
from faststream.nats.response import NatsPublishCommand
from faststream.nats.security import NatsSecurity, NatsUserPassword
from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from faststream.prometheus import ConsumeAttrs, MetricsSettingsProvider, PrometheusMiddleware
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from prometheus_client import REGISTRY, CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.bus import (
    CA_FILE_ENV,
    CREDENTIALS_FILE_ENV,
    BusCredential,
    inbox_prefix,
    read_credential,
)

# What a `durable_pull` handler takes: `async def handle(batch: BatchMessage) -> None`.
BatchMessage = Annotated[NatsBatchMessage, Context("message")]

# A stop waits this long for the batch in hand to be handled before cancelling it.
GRACEFUL_STOP_SECONDS = 30.0


def bus_security(credential: BusCredential | None = None) -> NatsSecurity | None:
    """This process's login (`credential`, else the environment's file) and TLS, as `connect`
    uses them."""
    credentials_file = os.environ.get(CREDENTIALS_FILE_ENV)
    if credential is None and credentials_file:
        credential = read_credential(Path(credentials_file))
    ca_file = os.environ.get(CA_FILE_ENV)
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    if credential is not None:
        return NatsUserPassword(credential.user, credential.password, ssl_context=context)
    return NatsSecurity(ssl_context=context) if context is not None else None


def service_broker(
    url: str,
    service: str,
    *,
    registry: CollectorRegistry = REGISTRY,
    credential: BusCredential | None = None,
    **options: Any,
) -> NatsBroker:
    """A broker named after `service`, with the telemetry middlewares. Its per-message log lines
    are DEBUG: the services log what they do themselves."""
    user = credential.user if credential is not None else _environment_user()
    return NatsBroker(
        url,
        name=f"taskbus-{service}",
        security=bus_security(credential),
        inbox_prefix=inbox_prefix(user) if user else "_INBOX",
        graceful_timeout=GRACEFUL_STOP_SECONDS,
        log_level=logging.DEBUG,
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


def _environment_user() -> str | None:
    credentials_file = os.environ.get(CREDENTIALS_FILE_ENV)
    return read_credential(Path(credentials_file)).user if credentials_file else None


def durable_pull(
    broker: NatsBroker,
    subject: str | Sequence[str],
    *,
    stream: str,
    config: ConsumerConfig,
    batch_size: int,
    timeout: float,
) -> BatchPullStreamSubscriber:
    """A durable pull consumer handing its handler batches of up to `batch_size` messages
    (whatever arrives within `timeout`), in log order. Nothing is acked for the handler: it
    acks, naks (with a delay), terms or keeps `in_progress` each message itself, through
    `message.raw_message`. `config.durable_name` names the consumer."""
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
        pull_sub=PullSub(batch_size=batch_size, timeout=timeout, batch=True),
        ack_policy=AckPolicy.MANUAL,
    )
    assert isinstance(subscriber, BatchPullStreamSubscriber)
    return subscriber


def connection(broker: NatsBroker) -> Client:
    """The broker's NATS connection, once `connect` or `start` has run."""
    client: Client = broker.config.connection_state.connection
    return client


def jetstream(broker: NatsBroker) -> JetStreamContext:
    """The broker's JetStream context, once `connect` or `start` has run."""
    js: JetStreamContext = broker.config.connection_state.stream
    return js
