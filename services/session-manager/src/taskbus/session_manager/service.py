"""Session-manager at run time: consumes commands and events, admits, and drives agent loops.

Each conversation's state lives in memory as the fold of its log (`Conversations`). A
conversation whose state changed gets a driver task that asks `next_step` what to do, does it
(append, call the LLM, readmit) and repeats until the answer is to wait; so conversations
progress concurrently and a restarted service picks up from the log.

Commands and events arrive through two FastStream durable pull consumers, in batches in log
order. A message is acked once its effect is stored (appended, or put in KV); what a failed
batch left unacked is nacked with a short delay, so it comes back in a second rather than after
the ack_wait. Nothing is handled before the conversations to recover are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender, StaleAppend, StreamFull
from taskbus.contracts.broker import ServiceBroker, jetstream
from taskbus.contracts.commands import (
    QUEUE_FULL,
    AnyCommand,
    ConversationCommand,
    CreateConversation,
    SecretsCommand,
    UpdateSettings,
)
from taskbus.contracts.events import (
    AnyEvent,
    CondensationAction,
    ConversationCreated,
    ConversationRejected,
    ConversationStatusChanged,
    ErrorObservation,
    Event,
    EventSource,
    LLMMetrics,
    LLMWaiting,
    MessageAction,
    ToolCallsQueued,
    UnknownEvent,
)
from taskbus.contracts.inbound import DeadLetters, Refused, inbound_command, inbound_event
from taskbus.contracts.observability import consuming, conversation
from taskbus.contracts.partitions import PartitionLeases, default_instance_id, partition_of
from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.contracts.status import SETTLED_STATUSES, AgentState, ConversationStatus
from taskbus.contracts.tasks import cancel_and_wait
from taskbus.session_manager import commands, log
from taskbus.session_manager.admission_desk import AdmissionDesk
from taskbus.session_manager.admission_ledger import AdmissionLedger
from taskbus.session_manager.condensation import plan_condensation
from taskbus.session_manager.conversations import Conversations
from taskbus.session_manager.decide import (
    Step,
    agent_state_event,
    as_proposal,
    is_settled,
    next_step,
    status_event,
)
from taskbus.session_manager.dependency_desk import DependencyDesk
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.llm import LLM, Completion, LLMConfig, LLMError, token_bound
from taskbus.session_manager.partition_consumers import (
    COMMANDS_MAX_DELIVER,
    EVENTS_POISON_DELIVERIES,
    PartitionConsumers,
)
from taskbus.session_manager.runtime_desk import RuntimeDesk
from taskbus.session_manager.secrets_store import SecretsStore
from taskbus.session_manager.settings import SessionManagerSettings
from taskbus.session_manager.state import ConversationState, apply
from taskbus.session_manager.stuck import is_stuck, stuck_events
from taskbus.session_manager.time_limits import LocalClock, time_limit_events
from taskbus.session_manager.tools import event_for_call, offered_tools

logger = logging.getLogger(__name__)

TITLE_LENGTH = 60
# The code of the error event telling a conversation that a message about it was given up.
GIVEN_UP = "message_given_up"
_RETRY_DRIVER_SECONDS = 1.0


def conversation_title(spec: ConversationSpec) -> str:
    if spec.title:
        return spec.title
    text = " ".join((spec.initial_user_msg or "").split())
    if len(text) <= TITLE_LENGTH:
        return text or "Untitled conversation"
    return text[: TITLE_LENGTH - 1].rstrip() + "…"


def effective_spec(
    spec: ConversationSpec, user: UserSettings | None, settings: SessionManagerSettings
) -> ConversationSpec:
    """The spec with its limits and confirmation mode resolved (request, then user settings,
    then operator default) and capped by the operator's maxima (priority, budget), so the log
    records what applied. The runtime resolves the command timeouts left unset."""
    user = user or UserSettings()
    timeouts = spec.timeouts
    budget = spec.max_budget_per_task or user.max_budget_per_task or settings.max_budget_per_task
    if settings.max_budget_per_task_limit is not None:
        budget = min(
            budget or settings.max_budget_per_task_limit, settings.max_budget_per_task_limit
        )
    confirmation_mode = spec.confirmation_mode
    return msgspec.structs.replace(
        spec,
        confirmation_mode=user.confirmation_mode
        if confirmation_mode is None
        else confirmation_mode,
        priority=min(spec.priority, settings.max_priority),
        max_iterations=spec.max_iterations or user.max_iterations or settings.max_iterations,
        max_budget_per_task=budget,
        mcp_config=spec.mcp_config if spec.mcp_config is not None else user.mcp_config,
        timeouts=msgspec.structs.replace(
            timeouts,
            no_change_seconds=timeouts.no_change_seconds or user.no_change_timeout_seconds,
            idle_seconds=timeouts.idle_seconds or settings.idle_seconds,
            max_duration_seconds=timeouts.max_duration_seconds or settings.max_duration_seconds,
        ),
    )


class SessionManager:
    """Built on a connected broker: it declares its consumers there, so they start with the
    broker; `start` then recovers and lets them handle what they hold."""

    def __init__(self, settings: SessionManagerSettings, broker: ServiceBroker, llm: LLM) -> None:
        js = jetstream(broker)
        self._settings = settings
        self._js = js
        self._llm = llm
        self._appender = EventAppender(js)
        self._dead_letters = DeadLetters(js, subjects.SESSION_MANAGER)
        self._settings_store = log.SettingsStore(js)
        self._secrets_store = SecretsStore(js)
        self._verdicts = log.VerdictStore(js)
        self._conversations = Conversations(
            js, self._on_change, snapshot_every=settings.snapshot_every_events
        )
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._clock = LocalClock()  # the time limits count on it, not on events' timestamps
        self._admission = AdmissionDesk(
            settings,
            self._conversations.states,
            self._settings_store.get,
            self._append,
            AdmissionLedger(js),
            holds=self._holds,
        )
        # Held while deciding from a conversation's state and appending what was decided, so a
        # command's verdict and the driver's steps never act on a state the other has changed.
        # Never taken while the admission lock is held.
        self._deciding: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._dependencies = DependencyDesk(
            self._conversations, self._deciding, self._admission, self._append
        )
        self._runtimes = RuntimeDesk(js, settings, self._conversations, self._deciding)
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._consumers = PartitionConsumers(
            broker,
            on_events=self._on_event_message,
            on_commands=self._on_commands,
            recover=self._recover,
            release=self._release,
        )
        self._leases: PartitionLeases | None = None

    @property
    def held_partitions(self) -> frozenset[int]:
        """The partitions whose conversations this instance drives now."""
        return self._consumers.partitions

    @property
    def queued(self) -> int:
        """QUEUED conversations of the partitions held here (the admission queue gauge)."""
        return sum(
            1
            for state in self._conversations.states.values()
            if state.status == ConversationStatus.QUEUED
            and not state.deleted
            and self._holds(state.conversation_id)
        )

    @property
    def held_conversations(self) -> frozenset[str]:
        """The conversations whose state is in memory (the others are folded when needed)."""
        return frozenset(self._conversations.states)

    # --- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take this instance's share of the partitions (each one's conversations recovered
        from the log before its consumers start), then keep it as instances come and go."""
        await self._runtimes.start()  # the runners known before anything is placed
        await self._settings_store.watch()
        await self._consumers.start()
        self._leases = PartitionLeases(
            await self._js.key_value(subjects.PARTITIONS_BUCKET),
            subjects.SESSION_MANAGER,
            self._settings.instance_id or default_instance_id(),
            on_acquired=self._consumers.acquired,
            on_lost=self._consumers.lost,
        )
        await self._leases.start()
        self._background.add(asyncio.create_task(self._sweep(), name="sweep"))
        await self._admission.admit_waiting()

    async def stop(self) -> None:
        """Consumers first (each finishes the message in hand; the leases are handed back so
        other instances take the partitions at once), then the drivers and the background work
        are cancelled."""
        self._stopping = True
        if self._leases is not None:
            await self._leases.stop()
        await self._consumers.stop()
        await self._runtimes.stop()
        await cancel_and_wait(*self._drivers.values(), *self._background, *self._dependencies.tasks)
        await self._settings_store.stop()

    async def _recover(self, partitions: frozenset[int]) -> None:
        """Load the conversations of newly held partitions that may need work."""
        recovered = await log.conversations_to_recover(self._js, partitions)
        states = [await self._conversations.load(cid) for cid in recovered]
        await self._admission.settle(*states)  # one ledger write for all of them
        logger.info(
            "recovered %d conversations of partitions %s", len(recovered), sorted(partitions)
        )
        if recovered:
            self._in_background(self._admission.admit_waiting())

    async def _release(self, partitions: frozenset[int]) -> None:
        """Stop driving the conversations of partitions no longer held, and drop their states:
        their new holder folds them from the log."""
        leaving = [cid for cid in self._drivers if partition_of(cid) in partitions]
        # Each driver has ended before its state goes: one that lost its cancel (cancel_and_wait
        # says how) went on driving a forgotten conversation, failing on it in a loop. What is
        # in memory is read after the wait: the sweep may have forgotten some meanwhile.
        await cancel_and_wait(*(self._drivers.pop(cid) for cid in leaving))
        for cid in [cid for cid in self._conversations.states if partition_of(cid) in partitions]:
            self._forget(cid)

    async def _sweep(self) -> None:
        """Every `time_limit_check_seconds` until `stop` cancels it: apply the time limits, and
        forget settled conversations (and ids that name none: unknown or rejected) so memory
        holds only those that may still move."""
        while True:
            await asyncio.sleep(self._settings.time_limit_check_seconds)
            self._dependencies.recheck(fresh=self._holds)
            try:
                await self._admission.repair()
                await self._admission.admit_waiting()  # slots freed by other instances
            except Exception:
                logger.exception("admission sweep failed; retrying")
            held = [cid for cid in self._conversations.states if self._holds(cid)]
            await self._runtimes.declare_lost(held, self._append)
            now = datetime.now(UTC)
            for cid, state in list(self._conversations.states.items()):
                if self._conversations.states.get(cid) is not state:
                    continue  # changed during an append of this sweep
                if is_settled(state) or not state.created or not self._holds(cid):
                    self._forget(cid)  # another instance's: folded afresh when needed
                    continue
                if not self._time_limit_events(state, now):
                    continue
                logger.info("%s reached a time limit", cid)
                try:
                    await self._decide_and_append(
                        cid, functools.partial(self._time_limit_events, now=now)
                    )
                except Exception:
                    logger.exception("time limit of %s not applied; retrying", cid)

    def _time_limit_events(self, state: ConversationState, now: datetime) -> list[Event]:
        local = self._clock.local(state, now)
        return time_limit_events(local, now, self._settings.sandbox_release_seconds)

    def _forget(self, conversation_id: str) -> None:
        """Drop a settled conversation's state unless a task is using it."""
        in_use = conversation_id in self._drivers or self._deciding[conversation_id].locked()
        if self._conversations.forget(conversation_id, in_use=in_use):
            self._deciding.pop(conversation_id, None)
            self._clock.forget(conversation_id)

    # --- state ----------------------------------------------------------------------------

    async def _observe(self, event: AnyEvent | UnknownEvent, sequence: int) -> None:
        await self._conversations.observe(event, sequence)
        cid = event.conversation_id
        if isinstance(event, ConversationStatusChanged) and cid in self._conversations.states:
            await self._admission.settle(self._conversations[cid])  # the ledger follows
            if event.status in SETTLED_STATUSES:
                self._in_background(self._admission.admit_waiting())  # a slot may be free

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _append(self, events: Sequence[Event], after: int) -> list[Event]:
        """Append what was decided on the conversation's state up to event id `after`, all of
        it or nothing, and return it (with its ids) once the in-memory state includes it.
        `StaleAppend` if the log had moved on: the state is folded again first, for the caller
        to decide anew (a stalled instance may have gone on appending after this one folded
        it). After an unclear failure (a timeout: the events may be stored) it is folded again
        too, or dropped if the log cannot be read, so the next decision is not taken without
        them (a retried LLM step would call the model again)."""
        if not events:
            return []
        cid = events[0].conversation_id
        placed = await self._runtimes.placed(events)
        try:
            appended = await self._appender.append_decision(placed, after)
        except StaleAppend:
            await self._conversations.refold(cid)
            raise
        except Exception:
            with contextlib.suppress(Exception):
                await self._conversations.refold(cid)
            raise
        await self._conversations.include(appended)
        return appended

    async def _decide_and_append(
        self, conversation_id: str, decide: Callable[[ConversationState], Sequence[Event]]
    ) -> list[Event]:
        """Append what `decide` makes of the conversation's state, under its lock, and return
        it; decided again on the state folded anew whenever the log had moved on."""
        while True:
            async with self._deciding[conversation_id]:
                state = await self._conversations.load(conversation_id)
                try:
                    return await self._append(decide(state), state.last_event_id)
                except StaleAppend:
                    continue

    # --- events consumer ------------------------------------------------------------------

    async def _on_event_message(self, batch: list[Msg]) -> None:
        for msg in batch:
            try:
                event = inbound_event(msg.subject, msg.data)
            except Refused as refused:
                await self._dead_letters.refuse(msg, refused)
                continue
            try:
                # In the event's trace: the driver it kicks (and its LLM call) continues it.
                with consuming(msg.subject, msg.headers, event.conversation_id):
                    await self._observe(event, msg.metadata.sequence.stream)
                    if not isinstance(event, UnknownEvent):
                        await self._runtimes.forward(event, msg)
            except Exception as error:
                poisoned = (
                    not isinstance(error, (nats.errors.Error, TimeoutError, StreamFull))
                    and msg.metadata.num_delivered >= EVENTS_POISON_DELIVERIES
                )
                if not poisoned:
                    raise  # nak'd: redelivered in a second
                # Never an error event about an error event, and so on.
                told = None if _is_give_up(event) else event.conversation_id
                await self._give_up(msg, told, error)
                continue
            await msg.ack()

    async def _give_up(self, msg: Msg, conversation_id: str | None, error: Exception) -> None:
        """A message that failed on its last delivery: logged, kept as a dead letter (acked),
        and told on its conversation if it names one, so nothing is dropped silently. The
        error's name only: its text may quote what the message carried."""
        deliveries = msg.metadata.num_delivered
        logger.error("%s failed on all %d deliveries; given up", msg.subject[:200], deliveries)
        reason = f"failed on all {deliveries} deliveries: {type(error).__name__}"
        await self._dead_letters.refuse(msg, Refused(reason))
        if conversation_id is None:
            return
        told = ErrorObservation(
            conversation_id=conversation_id,
            source=EventSource.ENVIRONMENT,
            code=GIVEN_UP,
            content=f"session-manager gave up on a message on {msg.subject[:200]}: {reason}",
        )
        try:
            await self._appender.append_all([told])
        except Exception:
            logger.exception("no error event on %s for its given-up message", conversation_id)

    # --- drivers --------------------------------------------------------------------------

    def _on_change(self, state: ConversationState) -> None:
        """Drive a conversation of a held partition; another's state is here only as a
        dependency (its owner drives it)."""
        self._clock.saw(state)
        held = self._holds(state.conversation_id)
        if held:
            self._kick(state.conversation_id)
        self._dependencies.on_change(state, held=held)

    def _holds(self, conversation_id: str) -> bool:
        return partition_of(conversation_id) in self._consumers.partitions

    def _kick(self, conversation_id: str) -> None:
        """Make sure a driver looks at the conversation's (new) state."""
        if conversation_id not in self._drivers:
            with conversation(conversation_id):  # the task's log lines name it
                self._drivers[conversation_id] = asyncio.create_task(
                    self._drive(conversation_id), name=f"drive-{conversation_id}"
                )

    async def _drive(self, conversation_id: str) -> None:
        try:
            while True:
                async with self._deciding[conversation_id]:
                    state = await self._conversations.load(conversation_id)
                    step = next_step(state)
                    if isinstance(step, list):
                        with contextlib.suppress(StaleAppend):  # then decided again
                            await self._append(step, state.last_event_id)
                        continue
                if step is Step.WAIT:
                    return  # `finally` unregisters before any other task runs: no lost kick
                try:
                    if step is Step.CALL_LLM:
                        await self._step_llm(state)
                    else:
                        await self._admission.readmit(conversation_id)
                except StaleAppend:
                    continue  # the state was folded again: decide anew
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("driver of %s failed; retrying", conversation_id)
            asyncio.get_running_loop().call_later(
                _RETRY_DRIVER_SECONDS, self._kick, conversation_id
            )
        finally:
            self._drivers.pop(conversation_id, None)

    async def _step_llm(self, state: ConversationState) -> None:
        """One agent step: stop if stuck, condense if the prompt is too long, else call the LLM
        and append its metrics, then its chosen action. Each append is re-checked against the
        state then current, since the user may have stopped or paused meanwhile.

        The metrics and the action are two decisions, not one atomic batch: on a single-replica
        file stream every batch is staged in a file store of its own (about 3 ms of
        nats-server's CPU, against 0.1-0.2 ms for a single append), and this pair is most of a
        task's appends. Cut off between the two (a crash, a hand-over), the log holds a paid
        call without its answer, a state like any other: the next holder calls the model
        again, and both calls are on record."""
        cid = state.conversation_id
        user_settings = await self._settings_store.get(state.user_id)
        try:
            config = self._llm.config_for(state.user_id, user_settings)
        except LLMError as error:
            await self._fail_llm_step(cid, error)
            return
        async with self._deciding[cid]:
            state = await self._conversations.load(cid)
            if next_step(state) is not Step.CALL_LLM:
                return
            if is_stuck(state, self._settings.stuck_repetitions):
                logger.warning("%s is stuck: the same action and result repeated", cid)
                events = stuck_events(state, self._settings.stuck_repetitions)
                await self._append(events, state.last_event_id)
                return
        condensation = await self._condensation(state, config)
        if condensation is not None:
            logger.info(
                "condensing %s: events %d..%d forgotten",
                cid,
                condensation.forgotten_start_id,
                condensation.forgotten_end_id,
            )
            await self._append([condensation], state.last_event_id)
            return

        def limited(code: str) -> Callable[[ConversationState], list[Event]]:
            def events(current: ConversationState) -> list[Event]:
                if (
                    code == "llm_rate_limited"
                    and current.agent_state == AgentState.RUNNING
                    and next_step(current) is Step.CALL_LLM
                ):
                    return [agent_state_event(current, AgentState.RATE_LIMITED, code)]
                return []

            return events

        async def rate_limited(code: str, delay: float) -> None:
            await self._decide_and_append(cid, limited(code))

        async def waiting(elapsed: float, attempt: int, attempts: int) -> None:
            """The heartbeat of a call still unanswered; a failed one is only logged, the call
            goes on (and its deadline holds)."""

            def heartbeat(current: ConversationState) -> list[Event]:
                if next_step(current) is not Step.CALL_LLM:
                    return []  # stopped or paused meanwhile: nothing waits on the answer
                return [
                    LLMWaiting(
                        conversation_id=cid,
                        source=EventSource.AGENT,
                        elapsed_seconds=round(elapsed, 3),
                        attempt=attempt,
                        attempts=attempts,
                        timeout_seconds=self._settings.llm_timeout_seconds,
                    )
                ]

            try:
                await self._decide_and_append(cid, heartbeat)
            except Exception:
                logger.exception("heartbeat of %s's LLM call not appended", cid)

        try:
            completion = await self._llm.complete(
                config, to_messages(state), offered_tools(state.mcp_tools), rate_limited, waiting
            )
        except LLMError as error:
            await self._fail_llm_step(cid, error)
            return
        acting = False

        def paid(current: ConversationState) -> list[Event]:
            nonlocal acting
            acting = next_step(current) is Step.CALL_LLM
            return _paid(current, completion)

        *_, metrics = await self._decide_and_append(cid, paid)

        def answer(current: ConversationState) -> list[Event]:
            """The answer's action if the agent was to act when the call was paid for and
            nothing but measurements came since (a limit the call itself reached does not drop
            it), or if it is still to act after what came (a stop or a pause drops it: paid
            for, not acted on)."""
            undisturbed = acting and current.last_decisive_event_id == metrics.id
            if undisturbed or next_step(current) is Step.CALL_LLM:
                return [as_proposal(current, _action_of(current, completion))]
            return []

        await self._decide_and_append(cid, answer)

    async def _fail_llm_step(self, conversation_id: str, error: LLMError) -> None:
        logger.warning("LLM call for %s failed: %s", conversation_id, error.code)

        def failed(current: ConversationState) -> list[Event]:
            if next_step(current) is not Step.CALL_LLM:
                return []
            return _llm_failure_events(current, error)

        await self._decide_and_append(conversation_id, failed)

    async def _condensation(
        self, state: ConversationState, config: LLMConfig
    ) -> CondensationAction | None:
        """The condensation due before the next call, if the prompt would not fit. Token
        counting is CPU work (milliseconds a step): skipped while `token_bound` shows the prompt
        fits, else done off the event loop, so other conversations keep moving."""
        max_tokens = await self._llm.max_input_tokens(config)
        if max_tokens is None:
            return None
        tools = offered_tools(state.mcp_tools)
        bound = token_bound(to_messages(state), tools)
        if bound is not None and bound <= max_tokens:
            return None
        return await asyncio.to_thread(
            plan_condensation,
            state,
            lambda messages: self._llm.count_tokens(config, messages, tools),
            max_tokens,
            self._settings.condensation_keep_recent_events,
        )

    # --- commands -------------------------------------------------------------------------

    async def _on_commands(self, batch: list[Msg]) -> None:
        """Commands of different conversations are handled concurrently, each one's in order."""
        groups: dict[str, list[tuple[Msg, AnyCommand]]] = defaultdict(list)
        for msg in batch:
            try:
                command = inbound_command(msg.subject, msg.data)
            except Refused as refused:
                await self._dead_letters.refuse(msg, refused)
                continue
            key = getattr(command, "conversation_id", f"user:{command.user_id}")
            groups[key].append((msg, command))
        await asyncio.gather(*(self._handle_in_order(group) for group in groups.values()))

    async def _handle_in_order(self, group: list[tuple[Msg, AnyCommand]]) -> None:
        for msg, command in group:
            try:
                with consuming(msg.subject, msg.headers, getattr(command, "conversation_id", None)):
                    await self._handle(command, redelivered=msg.metadata.num_delivered > 1)
            except Exception as error:
                if msg.metadata.num_delivered >= COMMANDS_MAX_DELIVER:
                    await self._give_up(msg, getattr(command, "conversation_id", None), error)
                    continue
                logger.exception("command %s failed; it will be redelivered", command.name())
                await msg.nak(delay=_RETRY_DRIVER_SECONDS)
                return
            await msg.ack()

    async def _handle(self, command: AnyCommand, *, redelivered: bool) -> None:
        match command:
            case CreateConversation():
                await self._create(command)
            case UpdateSettings():
                await self._settings_store.put(command.user_id, command.settings)
            case SecretsCommand():
                await self._secrets_store.apply(command)
            case _:
                await self._answer(command, redelivered=redelivered)

    async def _answer(self, command: ConversationCommand, *, redelivered: bool) -> None:
        """Decide, append what an accepted command appends, then store the verdict for the
        asker: a 202 means its events are in the log. A command whose id already has a verdict
        (a retry JetStream no longer deduplicates, or a redelivery) gets that verdict again and
        is not re-run; only a command that may have one looks it up."""
        command_id = command.command_id
        earlier = None
        if command_id is not None and commands.may_have_a_verdict(command, redelivered):
            earlier = await self._verdicts.get(command_id)
        if earlier is not None and earlier.conversation_id == command.conversation_id:
            await self._verdicts.put(earlier)
            return
        cid = command.conversation_id
        async with self._deciding[cid]:
            while True:  # decided again on the refolded state if the log had moved on
                state = await self._conversations.load(cid)
                decision = commands.verdict(state, command)
                try:
                    if isinstance(decision, commands.Accept):
                        if decision.admit:
                            decision = await self._restart(cid) or decision
                        else:
                            await self._append(decision.events, state.last_event_id)
                except StaleAppend:
                    continue  # e.g. a runner's output came between the fold and the append
                break
            answer = commands.command_verdict(command, self._conversations[cid], decision)
        if isinstance(decision, commands.Refuse):
            logger.info("%s on %s refused: %s", command.name(), cid, decision.detail)
        if answer is not None:
            await self._verdicts.put(answer)

    async def _restart(self, conversation_id: str) -> commands.Refuse | None:
        """Admit a stopped conversation again; refused if the user's queue is full."""
        refused = await self._admission.restart(conversation_id)
        if refused is None:
            return None
        return commands.Refuse(reason=QUEUE_FULL, detail=refused.detail)

    async def _create(self, command: CreateConversation) -> None:
        """Create the conversation unless its id is used. Only the admission decision and its
        append hold the admission lock: the reads before it need none (a conversation's
        commands are handled one at a time, `_on_commands`), so a burst of creates waits for
        them side by side, not one after another."""
        cid = command.conversation_id
        if await log.conversation_exists(self._js, cid):
            logger.info("conversation %s already exists; CreateConversation ignored", cid)
            return
        # Fresh: the gateway answered a settings change once the bucket showed it.
        user_settings = await self._settings_store.get(command.user_id, fresh=True)
        spec = effective_spec(command.spec, user_settings, self._settings)
        created = ConversationCreated(
            conversation_id=cid,
            source=EventSource.USER,
            user_id=command.user_id,
            spec=spec,
            title=conversation_title(spec),
        )
        state = apply(
            ConversationState(conversation_id=cid), msgspec.structs.replace(created, id=0)
        )
        async with self._admission.lock:
            refused = await self._admission.start_or_queue(state, [created], new=True)
        if refused is not None:
            rejected = ConversationRejected(
                conversation_id=cid,
                source=EventSource.ENVIRONMENT,
                user_id=command.user_id,
                reason=refused.reason,
                detail=refused.detail,
            )
            await self._append([rejected], -1)  # refused: nothing was appended


def _paid(state: ConversationState, completion: Completion) -> list[Event]:
    """What an answered LLM call appends first, whatever the state now: its metrics (it was
    paid for), after leaving RATE_LIMITED if the call ended a wait for the provider."""
    events: list[Event] = []
    if state.agent_state == AgentState.RATE_LIMITED:
        events.append(agent_state_event(state, AgentState.RUNNING))
    events.append(
        LLMMetrics(
            conversation_id=state.conversation_id,
            source=EventSource.AGENT,
            model=completion.model,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cost=completion.cost,
            accumulated_cost=state.accumulated_cost + completion.cost,
            latency_ms=completion.latency_ms,
            response_id=completion.response_id,
        )
    )
    return events


def _action_of(state: ConversationState, completion: Completion) -> Event:
    """The event for the LLM's answer: its tool call's action, the queue of its several tool
    calls, or a message to the user."""
    conversation_id = state.conversation_id
    calls = completion.tool_calls
    thought = completion.content or ""
    if not calls:
        return MessageAction(
            conversation_id=conversation_id,
            source=EventSource.AGENT,
            content=thought,
            wait_for_response=True,
        )
    if len(calls) == 1:
        return event_for_call(conversation_id, calls[0], thought, mcp_tools=state.mcp_tools)
    return ToolCallsQueued(
        conversation_id=conversation_id,
        source=EventSource.AGENT,
        calls=calls,
        thought=thought,
        response_id=completion.response_id,
    )


def _llm_failure_events(state: ConversationState, error: LLMError) -> list[Event]:
    return [
        ErrorObservation(
            conversation_id=state.conversation_id,
            source=EventSource.ENVIRONMENT,
            content=str(error),
            code=error.code,
        ),
        agent_state_event(state, AgentState.ERROR, error.code),
        status_event(state, ConversationStatus.ERROR, error.code),
    ]


def _is_give_up(event: AnyEvent | UnknownEvent) -> bool:
    return isinstance(event, ErrorObservation) and event.code == GIVEN_UP
