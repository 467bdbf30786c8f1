"""The runtime-runner process: a durable FastStream batch pull consumer on this runner's own work
subject (the events of the conversations placed on it, forwarded from the log by their
session-manager: contracts/runner_work.py) feeding `RuntimeRunner`, its registration heartbeat,
and the workspace responder, on one broker.

Acknowledgement: a message is acked only once its reply is in the log. While it waits in its
conversation's lane or runs (a command may take up to `command_seconds`), it is kept alive with
`in_progress()` every third of `ack_wait`, so slow work is never redelivered while it is still
running, and work lost in a crash is redelivered and, thanks to the reply check, done only once.
A failed event is retried `max_deliver` times in all; then it is logged and kept as a dead letter
(`taskbus.deadletter.runtime_runner`), never retried again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import nats.errors
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.broker import (
    BatchMessage,
    connection,
    durable_pull,
    jetstream,
    renew_while_held,
    service_broker,
)
from taskbus.contracts.events import (
    ConversationDeleted,
    Event,
    RuntimeControlRequested,
    RuntimeRequested,
    UnknownEvent,
)
from taskbus.contracts.inbound import DeadLetters, Refused
from taskbus.contracts.observability import consuming, span
from taskbus.contracts.observability_health import Vitals
from taskbus.contracts.runner_work import inbound_work
from taskbus.contracts.runners import SandboxIsolation
from taskbus.contracts.secret_box import SecretBox
from taskbus.contracts.specs import Resources
from taskbus.contracts.streams import ensure_streams
from taskbus.runtime_runner import metrics
from taskbus.runtime_runner.backend import (
    Backend,
    Registration,
    choose_backend,
    runner_info,
    sandbox_user,
)
from taskbus.runtime_runner.credentials import UserSecretsReader
from taskbus.runtime_runner.docker_sandbox import DockerEngine, DockerSandbox, DockerSandboxConfig
from taskbus.runtime_runner.journal import InFlightJournal
from taskbus.runtime_runner.lanes import Lanes
from taskbus.runtime_runner.limits import effective_resources, parse_labels
from taskbus.runtime_runner.local import LocalConfinement, LocalSandbox
from taskbus.runtime_runner.masking import MaskingAppender, SecretMasks
from taskbus.runtime_runner.mcp_clients import MCPClients, MCPLimits
from taskbus.runtime_runner.pool import WarmPool
from taskbus.runtime_runner.reconcile import local_recovery, reconcile
from taskbus.runtime_runner.replies import is_answered, is_given_back
from taskbus.runtime_runner.results import SandboxBuilder, WorkspaceResponder
from taskbus.runtime_runner.runner import (
    RuntimeRunner,
    SandboxCapacity,
    answer_cut_off_actions,
)
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.runtime_runner.shell import ShellLimits
from taskbus.runtime_runner.usage import UsageSampler
from taskbus.runtime_runner.workspace import HostWorkspaceSandbox

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=HostWorkspaceSandbox)

# The work consumer's batches: whatever its standing pull request has brought, handed over as
# soon as the first event comes (each event goes to its conversation's lane at once); the
# request is renewed every `_PULL_EXPIRES_SECONDS` while idle.
_WORK_BATCH = 16
_PULL_EXPIRES_SECONDS = 1.0
_RETRY_DELAY_SECONDS = 5.0


def shell_limits(settings: RuntimeRunnerSettings, request: RuntimeRequested) -> ShellLimits:
    timeouts = request.timeouts
    return ShellLimits(
        no_change_seconds=timeouts.no_change_seconds or settings.no_change_seconds,
        command_seconds=timeouts.command_seconds or settings.command_seconds,
        max_output_bytes=settings.max_output_bytes,
        max_streamed_bytes=settings.max_streamed_bytes,
    )


def docker_config(settings: RuntimeRunnerSettings, engine: DockerEngine) -> DockerSandboxConfig:
    return DockerSandboxConfig(
        engine,
        settings.sandbox_image,
        settings.runner_id,
        parse_labels(settings.sandbox_labels),
        user=sandbox_user(settings),
        runtime=settings.docker_runtime,
    )


def docker_sandbox_factory(
    settings: RuntimeRunnerSettings, config: DockerSandboxConfig
) -> Callable[[RuntimeRequested], DockerSandbox]:
    def new_sandbox(request: RuntimeRequested) -> DockerSandbox:
        return DockerSandbox(
            config,
            request.conversation_id,
            request.user_id,
            Path(settings.workspace_root),
            effective_resources(request.resources, settings),
            shell_limits(settings, request),
            settings.clone_seconds,
        )

    return new_sandbox


def local_sandbox_factory(
    settings: RuntimeRunnerSettings, isolation: SandboxIsolation
) -> Callable[[RuntimeRequested], LocalSandbox]:
    def new_sandbox(request: RuntimeRequested) -> LocalSandbox:
        confinement = LocalConfinement(
            bubblewrap=isolation == SandboxIsolation.BUBBLEWRAP,
            user=sandbox_user(settings),
            resources=effective_resources(request.resources, settings),
            max_file_bytes=settings.max_file_bytes,
            toolbox=Path(settings.sandbox_toolbox) if settings.sandbox_toolbox else None,
        )
        return LocalSandbox(
            request.conversation_id,
            Path(settings.workspace_root),
            shell_limits(settings, request),
            confinement,
            settings.clone_seconds,
        )

    return new_sandbox


def sandbox_factory(
    settings: RuntimeRunnerSettings, backend: Backend, docker: DockerSandboxConfig | None = None
) -> SandboxBuilder:
    """Sandboxes of the backend `choose_backend` chose; on docker, made with `docker` when
    given (the config the warm pool fills, see `warm_pool`)."""
    if backend.engine is not None:
        return docker_sandbox_factory(settings, docker or docker_config(settings, backend.engine))
    return local_sandbox_factory(settings, backend.isolation)


def warm_pool(
    settings: RuntimeRunnerSettings,
    backend: Backend,
    config: DockerSandboxConfig,
    room: Callable[[], float],
) -> WarmPool | None:
    """The runner's warm pool, set as where its docker sandboxes take containers from; None
    when the operator keeps none, or under gVisor: its gofer loses a bind mount whose host
    directory was renamed (stat and ls of the workspace fail with EINVAL after the hand-over),
    so there every sandbox starts cold."""
    if not settings.runner_warm_pool:
        return None
    if backend.isolation == SandboxIsolation.GVISOR:
        logger.warning("no warm pool under gVisor (runsc): every sandbox starts cold")
        return None
    pool = WarmPool(
        config,
        Path(settings.workspace_root),
        settings.runner_warm_pool,
        effective_resources(Resources(), settings),
        room,
    )
    config.warm = pool
    return pool


def sandbox_capacity(settings: RuntimeRunnerSettings) -> SandboxCapacity:
    return SandboxCapacity(
        max_sandboxes=settings.runner_max_sandboxes, wait_seconds=settings.sandbox_wait_seconds
    )


def mcp_clients(settings: RuntimeRunnerSettings) -> MCPClients:
    return MCPClients(
        SecretBox.from_settings(settings.secrets_key, settings.secrets_key_file),
        MCPLimits(settings.mcp_start_seconds, settings.mcp_call_seconds, settings.max_output_bytes),
    )


def with_secrets(
    factory: Callable[[RuntimeRequested], S], secrets: UserSecretsReader
) -> Callable[[RuntimeRequested], S]:
    """`factory`'s sandboxes, given their user's git token and sandbox secrets."""

    def new_sandbox(request: RuntimeRequested) -> S:
        sandbox = factory(request)
        sandbox.secrets = secrets.for_request(request)
        return sandbox

    return new_sandbox


def in_flight_journal(settings: RuntimeRunnerSettings) -> InFlightJournal:
    return InFlightJournal(Path(settings.workspace_root) / ".runner" / "in-flight")


def consumer_config(settings: RuntimeRunnerSettings) -> ConsumerConfig:
    durable = subjects.runtime_runner_durable(settings.runner_id)
    return ConsumerConfig(
        durable_name=durable,
        name=durable,
        filter_subject=subjects.runner_work(settings.runner_id),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_ack_pending=settings.max_ack_pending,
        max_deliver=settings.max_deliver,
    )


class EventDispatcher:
    """Feeds consumed messages to the runner in per-conversation lanes, skips answered events,
    acks after the reply is appended, keeps pending messages alive with `in_progress()`, and
    gives up on an event whose last delivery failed (a dead letter, not a silent drop)."""

    def __init__(
        self,
        js: JetStreamContext,
        appender: EventAppender,
        runner: RuntimeRunner,
        runner_id: str,
        max_deliver: int,
    ) -> None:
        self._js = js
        self._appender = appender
        self._runner_id = runner_id
        self._runner = runner
        self._max_deliver = max_deliver
        self._lanes = Lanes()
        self._dead_letters = DeadLetters(js, subjects.RUNTIME_RUNNER)
        # Messages taken but not yet acked, by identity (Msg is not hashable).
        self._in_flight: dict[int, Msg] = {}

    async def dispatch_batch(self, batch: BatchMessage) -> None:
        """A fetched batch, in log order: each conversation's lanes get its events in order."""
        for message in batch.raw_message:
            await self.dispatch(message)

    async def dispatch(self, message: Msg) -> None:
        try:
            event, event_sequence = inbound_work(self._runner_id, message)
        except Refused as refused:  # never acted on: its id may be a path on this host
            await self._dead_letters.refuse(message, refused)
            return
        if isinstance(event, UnknownEvent):
            await message.ack()
            return
        # Stop, pause, resume and delete must not wait behind a long command.
        lane = (
            "control"
            if isinstance(event, (RuntimeControlRequested, ConversationDeleted))
            else "work"
        )
        self._in_flight[id(message)] = message

        async def process() -> None:
            cid = event.conversation_id
            started = time.perf_counter()
            outcome = "skipped"
            try:
                # In the action's trace: the observation appended continues it.
                with consuming(message.subject, message.headers, cid):
                    if await is_given_back(self._js, cid, event.id, self._runner_id):
                        logger.info("%s %s: its runtime was lost here", event.kind, event.id)
                    elif await is_answered(
                        self._js,
                        cid,
                        event.id,
                        event_sequence,
                        seen=functools.partial(self._appender.saw, cid),
                    ):
                        logger.info("%s %s already answered", event.kind, event.id)
                    else:
                        outcome = "failed"
                        with span(f"sandbox {event.kind}", event_id=event.id):
                            await self._runner.handle(event)
                        outcome = "done"
                await message.ack()
            except Exception as error:
                await self._failed(message, event, error)
            finally:
                del self._in_flight[id(message)]
                metrics.ACTIONS.labels(event.kind, outcome).observe(time.perf_counter() - started)

        self._lanes.submit((event.conversation_id, lane), process)

    async def _failed(self, message: Msg, event: Event, error: Exception) -> None:
        """Retry later, or, on the last delivery JetStream makes (`max_deliver`), log it and keep
        it as a dead letter."""
        deliveries = message.metadata.num_delivered
        if deliveries < self._max_deliver:
            logger.error("handling %s %s failed; will retry", event.kind, event.id, exc_info=error)
            await message.nak(delay=_RETRY_DELAY_SECONDS)
            return
        logger.error(
            "handling %s %s of %s failed on all %d deliveries; given up",
            event.kind,
            event.id,
            event.conversation_id,
            deliveries,
            exc_info=error,
        )
        # The error's name only: its text may quote what the event carried.
        reason = f"failed on all {deliveries} deliveries: {type(error).__name__}"
        await self._dead_letters.refuse(message, Refused(reason))

    def in_flight(self) -> Iterable[Msg]:
        """The messages taken and not yet settled, which the ack wait must not run out on."""
        return self._in_flight.values()

    async def cancel(self) -> None:
        await self._lanes.cancel()


class RuntimeRunnerService:
    def __init__(self, settings: RuntimeRunnerSettings) -> None:
        self._settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then stop consuming, abandon the lanes, let go of the
        sandboxes and drain the connection."""
        settings = self._settings
        backend = await choose_backend(settings)  # before anything: it may refuse to start
        engine = backend.engine
        broker = service_broker(settings.nats_url, "runtime-runner")
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js, settings.stream_replicas)
        # Created or updated here: FastStream only binds to an existing durable, whose ack_wait,
        # max_ack_pending and max_deliver must follow the settings across restarts.
        await js.add_consumer(subjects.RUNNER_WORK_STREAM, consumer_config(settings))
        masks = SecretMasks()
        appender = MaskingAppender(js, masks)  # no secret value opened here reaches the log
        secrets = UserSecretsReader(
            js, SecretBox.from_settings(settings.secrets_key, settings.secrets_key_file), masks
        )
        journal = in_flight_journal(settings)
        docker = docker_config(settings, engine) if engine is not None else None
        new_sandbox = with_secrets(sandbox_factory(settings, backend, docker), secrets)
        runner = RuntimeRunner(
            appender,
            new_sandbox,
            settings.max_output_bytes,
            journal,
            Path(settings.workspace_root),
            # Docker sandboxes outlive the runner and are re-attached below, at start-up.
            recover=None
            if engine is not None
            else local_recovery(
                js,
                settings.runner_id,
                with_secrets(local_sandbox_factory(settings, backend.isolation), secrets),
            ),
            mcp=mcp_clients(settings),
            capacity=sandbox_capacity(settings),
        )
        pool = None
        if docker is not None:  # before consuming: redelivered actions find their sandbox
            await reconcile(
                docker.engine,
                settings.runner_id,
                js,
                with_secrets(docker_sandbox_factory(settings, docker), secrets),
                runner,
            )
            # After reconcile, so the pool fills in the room the re-attached sandboxes leave.
            pool = warm_pool(settings, backend, docker, runner.room)
            if pool is not None:
                await pool.start()
        # After reconcile, so the agent's next action finds its sandbox re-attached.
        interrupted = await answer_cut_off_actions(js, appender, journal)
        if interrupted:
            logger.info("answered %d actions cut off by the previous runner", interrupted)
        dispatcher = EventDispatcher(js, appender, runner, settings.runner_id, settings.max_deliver)
        consumer = durable_pull(
            broker,
            subjects.runner_work(settings.runner_id),
            dispatcher.dispatch_batch,
            stream=subjects.RUNNER_WORK_STREAM,
            config=consumer_config(settings),
            batch_size=_WORK_BATCH,
            expires=_PULL_EXPIRES_SECONDS,
        )
        # Workspace files of live and given-back sandboxes (list, read, zip, git, upload).
        results = WorkspaceResponder(broker, new_sandbox)
        await broker.start()  # consumes events and answers workspace requests from here on
        results.start()
        # Registered once it consumes: session-manager places sandboxes here from now on.
        registration = Registration(
            js, runner_info(settings, backend), lambda: len(runner.live_sandboxes())
        )
        await registration.publish()
        metrics.SANDBOXES_LIVE.set_function(lambda: len(runner.live_sandboxes()))
        vitals = Vitals(
            js,
            subjects.RUNTIME_RUNNER,
            instance=settings.runner_id,
            metrics_host=settings.metrics_host,
            metrics_port=settings.metrics_port,
            durables=lambda: [
                (subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(settings.runner_id))
            ],
        )
        await vitals.ready()
        registered = asyncio.create_task(registration.keep_alive())
        heartbeat = asyncio.create_task(
            renew_while_held(dispatcher.in_flight, settings.ack_wait_seconds / 3)
        )
        sampler = UsageSampler(appender, runner.live_sandboxes, settings.usage_interval_seconds)
        sampling = asyncio.create_task(sampler.run())
        logger.info("consuming %s as runner %s", subjects.RUNNER_WORK_STREAM, settings.runner_id)
        try:
            await stop.wait()
        finally:
            await vitals.stop()
            await consumer.stop()  # waits for the batch in hand: dispatching it takes no time
            await results.stop()
            heartbeat.cancel()
            registered.cancel()
            sampling.cancel()
            await dispatcher.cancel()  # unacked work is redelivered to the next runner
            if pool is not None:
                await pool.close()
            await runner.close(settings.remove_sandboxes_on_shutdown)
            if engine is not None:
                engine.close()
            await close(broker)


async def close(broker: NatsBroker) -> None:
    """Stop what still consumes and drain the connection, or close it where drain is refused
    (a closed or reconnecting connection)."""
    nc = connection(broker)
    try:
        await broker.stop()
    except nats.errors.Error as error:
        logger.debug("draining at shutdown failed: %r", error)
        await nc.close()
