"""Webhook delivery: status changes in, signed POSTs out, every attempt logged.

It runs in the gateway because the gateway is the edge: the one service that already talks to
users' side of the world, holds the key that seals (and so opens) webhook secrets, and owns the
registrations. Gateways are otherwise stateless, so every instance runs both consumers and the
durables share the work: each status change is fanned out once, each delivery attempted by one
instance at a time.

1. `gateway_webhooks` (TASKBUS_EVENTS, ConversationStatusChanged only, from the durable's
   creation on): checks each event as every consumer does (dead letters otherwise), finds the
   conversation's owner (its ConversationCreated) and their webhooks, and publishes one
   `DeliveryJob` per matching webhook to TASKBUS_WEBHOOK_JOBS with the delivery id as message
   id, so an event fanned out twice is delivered once. Acked once the jobs are stored.
2. `gateway_webhook_jobs` (the jobs, a work queue): each delivery is attempted as its own task
   (a slow receiver holds no one else's), then logged (TASKBUS_WEBHOOK_LOG), then acked (2xx),
   nak'ed with an exponentially growing delay (no answer, 408, 429, 5xx) or termed (any other
   answer, a refused address, the last attempt). The attempt number is the delivery count,
   bounded by max_deliver. A crash between POST and ack delivers again: at least once, with the
   same `X-Taskbus-Delivery` id for receivers to drop repeats.

Every attempt checks the URL again and connects to exactly the addresses it checked (a pinned
resolver), so a name that re-resolves to a private address between check and connection is
never reached; redirects are not followed; attempts time out after
`TASKBUS_WEBHOOK_TIMEOUT_SECONDS`. On stop, the consumers stop taking work and the attempts in
hand get that long to finish; an unfinished one is redelivered later.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from datetime import UTC, datetime

import aiohttp
import msgspec
import nats.errors
from aiohttp.abc import AbstractResolver, ResolveResult
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.broker import (
    BatchMessage,
    ServiceBroker,
    durable_pull,
    jetstream,
    service_broker,
)
from taskbus.contracts.events import ConversationCreated, ConversationStatusChanged
from taskbus.contracts.inbound import DeadLetters, Refused, inbound_event
from taskbus.contracts.llm_endpoints import (
    AllowList,
    EndpointRefused,
    EndpointUnresolved,
    IPAddress,
    check_open_destination,
)
from taskbus.contracts.lru import Lru
from taskbus.contracts.secret_box import SecretBox, SecretError
from taskbus.contracts.streams import ensure_streams, last_message
from taskbus.contracts.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AttemptOutcome,
    DeliveryAttempt,
    DeliveryJob,
    Webhook,
    delivery_id,
    event_of,
    outcome_of,
    payload_of,
    retry_delay,
    secret_context,
    signature,
)
from taskbus.gateway.settings import GatewaySettings
from taskbus.gateway.webhooks_store import WebhookStore

logger = logging.getLogger(__name__)

_STATUS_CHANGES = subjects.events_of_kind(ConversationStatusChanged.__name__)
_FAN_OUT_BATCH = 64
# How long a consumer's standing pull request lasts before it is renewed (messages come as they
# are stored).
_PULL_EXPIRES_SECONDS = 1.0
# Deliveries attempted at once by one gateway.
_CONCURRENT_ATTEMPTS = 16
# A fan-out that could not store its jobs (NATS busy) is tried again after this long.
_FAN_OUT_RETRY_SECONDS = 2.0
# Owners of recently seen conversations (a conversation's owner never changes).
_OWNERS_CACHED = 10_000
_MAX_ERROR_CHARS = 300
_job_decoder = msgspec.json.Decoder(DeliveryJob)


class _Pinned(AbstractResolver):
    """Resolves the URL's host to the addresses already checked, and nothing else."""

    def __init__(self, addresses: list[IPAddress]) -> None:
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self._addresses
        ]

    async def close(self) -> None:
        return None


class WebhookDelivery:
    def __init__(
        self,
        broker: ServiceBroker,
        settings: GatewaySettings,
        allowed: AllowList,
        box: SecretBox | None,
        store: WebhookStore,
    ) -> None:
        self._broker = broker
        self._js = jetstream(broker)
        self._settings = settings
        self._allowed = allowed
        self._box = box
        self._store = store
        self._dead_letters = DeadLetters(self._js, subjects.GATEWAY)
        self._slots = asyncio.Semaphore(_CONCURRENT_ATTEMPTS)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._owners: Lru[str, str] = Lru(_OWNERS_CACHED)  # conversation id -> user id
        self._consumers = [
            durable_pull(
                broker,
                _STATUS_CHANGES,
                self._fan_out,
                stream=subjects.EVENTS_STREAM,
                config=events_config(),
                batch_size=_FAN_OUT_BATCH,
                expires=_PULL_EXPIRES_SECONDS,
            ),
            # One at a time: each is handed to its own task at once, so none waits for a batch.
            durable_pull(
                broker,
                subjects.ALL_WEBHOOK_JOBS,
                self._take_job,
                stream=subjects.WEBHOOK_JOBS_STREAM,
                config=jobs_config(settings),
                batch_size=1,
                expires=_PULL_EXPIRES_SECONDS,
            ),
        ]

    @classmethod
    async def start(
        cls, settings: GatewaySettings, allowed: AllowList, box: SecretBox | None
    ) -> WebhookDelivery:
        """Both consumers, consuming, on a broker (NATS connection) of their own."""
        broker = service_broker(settings.nats_url, "gateway-webhooks")
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js, settings.stream_replicas)
        # Created or updated here: FastStream only binds to an existing durable, whose limits
        # must follow the settings across restarts.
        await js.add_consumer(subjects.EVENTS_STREAM, events_config())
        await js.add_consumer(subjects.WEBHOOK_JOBS_STREAM, jobs_config(settings))
        delivery = cls(broker, settings, allowed, box, await WebhookStore.open(js))
        await broker.start()
        return delivery

    async def stop(self) -> None:
        for consumer in self._consumers:
            await consumer.stop()
        if self._in_flight:
            _, unfinished = await asyncio.wait(
                self._in_flight, timeout=self._settings.webhook_timeout_seconds + 1
            )
            for task in unfinished:  # redelivered once its ack_wait passes
                task.cancel()
        await self._broker.stop()

    # --- 1. status changes into delivery jobs -------------------------------------------------

    async def _fan_out(self, batch: BatchMessage) -> None:
        for message in batch.raw_message:
            try:
                event = inbound_event(message.subject, message.data)
            except Refused as refused:
                await self._dead_letters.refuse(message, refused)
                continue
            try:
                if isinstance(event, ConversationStatusChanged):
                    await self._jobs_of(event)
            except (nats.errors.Error, TimeoutError) as error:
                logger.warning("webhook jobs of %s not stored yet: %r", message.subject, error)
                await message.nak(delay=_FAN_OUT_RETRY_SECONDS)
                continue
            await message.ack()

    async def _jobs_of(self, event: ConversationStatusChanged) -> None:
        owner = await self._owner(event.conversation_id)
        if owner is None:  # deleted (and purged) before its change was fanned out
            return
        kind = event_of(event.status)
        for hook in (await self._store.of_user(owner)).webhooks:
            if kind not in hook.events:
                continue
            job = DeliveryJob(
                delivery_id=delivery_id(hook.id, event.conversation_id, event.id),
                webhook_id=hook.id,
                user_id=owner,
                event=kind,
                conversation_id=event.conversation_id,
                event_id=event.id,
                status=event.status,
                reason=event.reason,
                timestamp=event.timestamp,
            )
            await self._js.publish(
                subjects.webhook_job_subject(hook.id),
                msgspec.json.encode(job),
                stream=subjects.WEBHOOK_JOBS_STREAM,
                headers={"Nats-Msg-Id": job.delivery_id},
            )

    async def _owner(self, conversation_id: str) -> str | None:
        owner = self._owners.get(conversation_id)
        if owner is None:
            subject = subjects.event_subject(conversation_id, ConversationCreated.__name__)
            message = await last_message(self._js, subject)
            if message is None or message.subject is None or message.data is None:
                return None
            try:
                created = inbound_event(message.subject, message.data)
            except Refused:
                return None
            if not isinstance(created, ConversationCreated):
                return None
            owner = created.user_id
            self._owners.put(conversation_id, owner)
        return owner

    # --- 2. delivery attempts -----------------------------------------------------------------

    async def _take_job(self, batch: BatchMessage) -> None:
        for message in batch.raw_message:
            await self._slots.acquire()
            task = asyncio.create_task(self._attempt(message))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("a webhook attempt failed", exc_info=task.exception())

    async def _attempt(self, message: Msg) -> None:
        try:
            job = _job_decoder.decode(message.data)
        except msgspec.DecodeError as error:
            await self._dead_letters.refuse(message, Refused(f"invalid webhook job: {error}"))
            return
        if message.subject != subjects.webhook_job_subject(job.webhook_id):
            await self._dead_letters.refuse(message, Refused("not the job's webhook subject"))
            return
        hook = (await self._store.of_user(job.user_id)).find(job.webhook_id)
        if hook is None:  # deleted since: nothing to deliver, nothing to log
            await message.ack()
            return
        number = message.metadata.num_delivered
        started = time.monotonic()
        status_code, why, outcome = await self._post(hook, job, number)
        attempt = DeliveryAttempt(
            delivery_id=job.delivery_id,
            webhook_id=job.webhook_id,
            event=job.event,
            conversation_id=job.conversation_id,
            event_id=job.event_id,
            status=job.status,
            attempt=number,
            at=datetime.now(UTC),
            status_code=status_code,
            error=why[:_MAX_ERROR_CHARS],
            outcome=outcome,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        delay = retry_delay(
            number, self._settings.webhook_retry_seconds, self._settings.webhook_max_retry_seconds
        )
        try:
            await self._store.log(attempt)
        except (nats.errors.Error, TimeoutError) as log_error:
            # Unlogged: tried again (a receiver that took it drops the repeat by its id).
            logger.warning("webhook attempt of %s not logged: %r", job.delivery_id, log_error)
            await message.nak(delay=delay)
            return
        if outcome is AttemptOutcome.DELIVERED:
            await message.ack()
        elif outcome is AttemptOutcome.RETRYING:
            await message.nak(delay=delay)
        else:
            logger.info("webhook delivery %s given up: %s", job.delivery_id, status_code or why)
            await message.term()

    async def _post(
        self, hook: Webhook, job: DeliveryJob, number: int
    ) -> tuple[int | None, str, AttemptOutcome]:
        """(status code, why there is none, outcome) of one POST."""
        max_attempts = self._settings.webhook_max_attempts
        if self._box is None:
            return None, "this server has no secrets key to sign with", AttemptOutcome.FAILED
        try:
            secret = self._box.open(hook.secret, secret_context(job.user_id, hook.id))
        except SecretError:
            return (
                None,
                "the signing secret does not open with this server's key",
                (AttemptOutcome.FAILED),
            )
        try:
            addresses = await check_open_destination(hook.url, self._allowed)
        except EndpointUnresolved as error:
            return None, str(error), outcome_of(None, number, max_attempts)
        except EndpointRefused as error:
            return None, f"refused: {error}", AttemptOutcome.FAILED
        sent_at = datetime.now(UTC)
        body = payload_of(job, sent_at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Taskbus-Webhooks/1",
            SIGNATURE_HEADER: signature(secret, body),
            DELIVERY_HEADER: job.delivery_id,
            TIMESTAMP_HEADER: str(int(sent_at.timestamp())),
            EVENT_HEADER: job.event,
        }
        connector = aiohttp.TCPConnector(resolver=_Pinned(addresses), force_close=True)
        timeout = aiohttp.ClientTimeout(total=self._settings.webhook_timeout_seconds)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.post(hook.url, data=body, headers=headers, allow_redirects=False) as answer,
            ):
                status_code = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            description = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            return None, description, outcome_of(None, number, max_attempts)
        return status_code, "", outcome_of(status_code, number, max_attempts)


def events_config() -> ConsumerConfig:
    name = subjects.WEBHOOK_EVENTS_DURABLE
    return ConsumerConfig(
        durable_name=name,
        name=name,
        filter_subject=_STATUS_CHANGES,
        deliver_policy=DeliverPolicy.NEW,  # from the first gateway on, not the whole past
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30,
        max_ack_pending=1000,
    )


def jobs_config(settings: GatewaySettings) -> ConsumerConfig:
    name = subjects.WEBHOOK_JOBS_DURABLE
    return ConsumerConfig(
        durable_name=name,
        name=name,
        filter_subject=subjects.ALL_WEBHOOK_JOBS,
        ack_policy=AckPolicy.EXPLICIT,
        # Waiting for a free slot, then the attempt (the URL's resolution included).
        ack_wait=3 * settings.webhook_timeout_seconds + 15,
        max_ack_pending=1000,
        max_deliver=settings.webhook_max_attempts,
    )
