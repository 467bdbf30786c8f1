"""The consumers of the partitions this instance holds (contracts.partitions leases them).

Each partition has two durables, its events and its commands, shared by whichever instance
holds the partition: a new holder resumes where the previous one acked, so a hand-over loses
and repeats nothing the log does not absorb. On acquiring partitions, the durables are created
(or updated) first, then the partitions' conversations are recovered from the log, then the
consumers start: an event appended meanwhile is both in the log read and delivered, and the
fold takes it once (`Conversations.observe` skips what it has). On losing partitions, their
consumers stop before anything else of theirs is dropped.

Why no action runs twice when a partition moves: every decision is a pure function of the
conversation's log (fold, then decide), so the new holder decides from what the old one
appended, never from what it had in mind; a decision is appended whole and only right after
the event its state was folded up to (`EventAppender.append_decision`), so of a stalled old
holder and the new one, whichever decided on a state the log has left appends nothing, folds
again and decides anew (the old holder's events consumer may have taken events the new
holder's fold never saw); and the runner answers each action once, checking the log for its
reply before running it (runtime_runner.replies).

A consumer keeps a pull request standing (`durable_pull`): a lone message
is handled as it comes, a backlog in one pass (FastStream's middlewares once per batch, and a
pull request per half batch, not per message), and 33 idle consumers renew one request every
IDLE_POLL_SECONDS each. A stopped consumer's requests catch nothing (the server skips a
request whose inbox no one reads), so on a graceful hand-over the new holder gets at once what
the old one had not taken; what the old one took and did not ack comes back after ack_wait,
which is short (a redelivered event is skipped by the fold; a redelivered command finds its
verdict).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.broker import BatchMessage, ServiceBroker, durable_pull, jetstream

logger = logging.getLogger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]
PartitionsHandler = Callable[[frozenset[int]], Awaitable[None]]

# How long an idle consumer's pull waits (a pull returns as soon as a message comes).
IDLE_POLL_SECONDS = 2.0
# At most this many messages a pass (a backlog after a restart comes in passes of this size).
BATCH_SIZE = 32
EVENTS_ACK_WAIT_SECONDS = 5.0
COMMANDS_ACK_WAIT_SECONDS = 15.0
# Deliveries of a command before JetStream stops redelivering it: on the last, a failing one is
# given up (dead letter, error event: `SessionManager._give_up`).
COMMANDS_MAX_DELIVER = 5
# Deliveries after which an event whose handling keeps failing, for any reason but the bus, is
# given up the same way. The events durables have no max_deliver: an event the server stopped
# redelivering because the bus was down (disk full, a lost connection) would be missing from the
# fold and never forwarded to its runner; such failures are retried until the bus is back.
EVENTS_POISON_DELIVERIES = 5
_RETRY_SECONDS = 1.0


def events_config(partition: int) -> ConsumerConfig:
    # A durable created for the first time starts at new events: recovery reads older ones.
    return ConsumerConfig(
        durable_name=subjects.session_manager_events_durable(partition),
        filter_subject=subjects.partition_events(partition),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW,
        max_ack_pending=-1,
        ack_wait=EVENTS_ACK_WAIT_SECONDS,
    )


def commands_config(partition: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.session_manager_commands_durable(partition),
        filter_subject=subjects.partition_commands(partition),
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=COMMANDS_MAX_DELIVER,
        ack_wait=COMMANDS_ACK_WAIT_SECONDS,
    )


def user_commands_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.SESSION_MANAGER_USER_COMMANDS_DURABLE,
        filter_subject=subjects.SESSION_MANAGER_USER_COMMANDS,
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=COMMANDS_MAX_DELIVER,
        ack_wait=COMMANDS_ACK_WAIT_SECONDS,
    )


class PartitionConsumers:
    """Starts and stops the partitions' consumers as leases come and go (`acquired`, `lost`
    are `PartitionLeases`' callbacks), plus the user commands' consumer every instance shares."""

    def __init__(
        self,
        broker: ServiceBroker,
        *,
        on_events: BatchHandler,
        on_commands: BatchHandler,
        recover: PartitionsHandler,
        release: PartitionsHandler,
    ) -> None:
        """`recover` loads the conversations of partitions about to be consumed; `release`
        drops those of partitions no longer consumed."""
        self._broker = broker
        self._on_events = on_events
        self._on_commands = on_commands
        self._recover = recover
        self._release = release
        self._consumers: dict[int, list[BatchPullStreamSubscriber]] = {}
        self._held: frozenset[int] = frozenset()
        self._user_commands: BatchPullStreamSubscriber | None = None

    @property
    def partitions(self) -> frozenset[int]:
        """The partitions held: from before their recovery until their loss."""
        return self._held

    async def start(self) -> None:
        """The user commands' consumer (settings, secrets): any instance applies them."""
        config = user_commands_config()
        await jetstream(self._broker).add_consumer(subjects.COMMANDS_STREAM, config)
        self._user_commands = self._consumer(
            subjects.SESSION_MANAGER_USER_COMMANDS,
            subjects.COMMANDS_STREAM,
            config,
            self._on_commands,
        )
        await self._user_commands.start()

    async def stop(self) -> None:
        """Stop every consumer (each finishes the message in hand)."""
        if self._user_commands is not None:
            await self._user_commands.stop()
        await self.lost(self._held)

    async def acquired(self, partitions: frozenset[int]) -> None:
        js = jetstream(self._broker)
        for partition in sorted(partitions):
            await js.add_consumer(subjects.EVENTS_STREAM, events_config(partition))
            await js.add_consumer(subjects.COMMANDS_STREAM, commands_config(partition))
        self._held |= partitions  # recovered conversations are this instance's to drive
        await self._recover(partitions)
        for partition in sorted(partitions):
            consumers = [
                self._consumer(
                    subjects.partition_events(partition),
                    subjects.EVENTS_STREAM,
                    events_config(partition),
                    self._on_events,
                ),
                self._consumer(
                    subjects.partition_commands(partition),
                    subjects.COMMANDS_STREAM,
                    commands_config(partition),
                    self._on_commands,
                ),
            ]
            self._consumers[partition] = consumers
            for consumer in consumers:
                await consumer.start()

    async def lost(self, partitions: frozenset[int]) -> None:
        self._held -= partitions
        stopping = [c for p in partitions for c in self._consumers.pop(p, [])]
        await asyncio.gather(*(consumer.stop() for consumer in stopping))
        if partitions:
            await self._release(partitions)

    def _consumer(
        self, subject: str, stream: str, config: ConsumerConfig, handle: BatchHandler
    ) -> BatchPullStreamSubscriber:
        """A durable pull consumer passing each message to `handle`, which acks it once its
        effect is stored. What a failed handling left unacked is nacked with a delay: it comes
        back in a second, not after the whole ack_wait."""

        async def consume(message: BatchMessage) -> None:
            try:
                await handle(message.raw_message)
            except Exception:
                logger.exception("failed to handle a message of %s; redelivering", subject)
                await message.nack(delay=_RETRY_SECONDS)

        consume.__name__ = f"{config.durable_name}_consume"  # FastStream's name of the handler
        return durable_pull(
            self._broker,
            subject,
            consume,
            stream=stream,
            config=config,
            batch_size=BATCH_SIZE,
            expires=IDLE_POLL_SECONDS,
        )
