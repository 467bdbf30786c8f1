"""The state of one conversation as a pure fold over its events.

Events carry dense ids, so applying is idempotent: an event at or below `last_event_id` changes
nothing. The state is therefore always exactly the fold of a prefix of the log, whether it was
built by replaying the log, by the durable consumer, or by applying our own appends (or started
from a snapshot of such a state: session_manager.snapshots).

Applying an event costs O(1) whatever the history's length: the history is a `History`, an
append-only list shared by successive states (see there), never copied per event.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import overload

import msgspec

from taskbus.contracts.events import (
    EXECUTABLE_ACTIONS,
    ActionProposed,
    AgentFinishAction,
    AgentStateChanged,
    CmdOutputObservation,
    CondensationAction,
    ConfirmationGiven,
    ConversationCreated,
    ConversationDeleted,
    ConversationRenamed,
    ConversationStatusChanged,
    DependenciesResolved,
    ErrorObservation,
    Event,
    EventSource,
    FileEditObservation,
    FileReadObservation,
    FileWriteObservation,
    LLMMetrics,
    LLMWaiting,
    MCPObservation,
    MCPTool,
    MCPToolsListed,
    MessageAction,
    ResourceUsage,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeLost,
    RuntimeRequested,
    RuntimeStatusChanged,
    TaskItem,
    TaskTrackingAction,
    TaskTrackingObservation,
    ThinkAction,
    ToolCallsQueued,
    UnknownEvent,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import (
    ACTIVE_STATUSES,
    AgentState,
    ConversationStatus,
    RuntimeStatus,
)
from taskbus.session_manager.dependencies import plan_problem

# Actions the agent chose, as they appear in the LLM's history.
AGENT_ACTIONS: tuple[type[Event], ...] = (
    *EXECUTABLE_ACTIONS,
    TaskTrackingAction,
    ThinkAction,
    AgentFinishAction,
)
OBSERVATIONS: tuple[type[Event], ...] = (
    CmdOutputObservation,
    FileReadObservation,
    FileWriteObservation,
    FileEditObservation,
    TaskTrackingObservation,
    MCPObservation,
    ErrorObservation,
)

# Reports that nothing here acts on (the sandbox's use of the host, an LLM call still waiting):
# they move only the log position, so they are no activity for the time limits, never in the
# LLM's history, and wake no driver.
MEASUREMENTS: tuple[type[Event], ...] = (ResourceUsage, LLMWaiting)

# Agent states in which queued tool calls still run; any other drops them (stop, finish, error,
# a rejected confirmation, a question to the user).
_WORKING = frozenset(
    {
        AgentState.RUNNING,
        AgentState.RATE_LIMITED,
        AgentState.AWAITING_USER_CONFIRMATION,
        AgentState.USER_CONFIRMED,
    }
)


# Bump when `apply` folds the same events into a different state: snapshots of another version
# are ignored (folded again from the log).
FOLD_VERSION = 1


class History(Sequence[Event]):
    """What the LLM sees, in log order: an immutable sequence that appends in O(1).

    Successive states share one list; each owns its first `len(self)` items. Appending to a
    history whose end is the list's end extends the list in place: no older state sees it, as
    each reads only its own prefix. Appending to any other (a branch, e.g. two events applied
    to one state) copies its prefix first, as does a condensation. So `apply` stays pure to
    every caller (old states never change), at the price of a mutable list inside frozen
    states: nothing but `appended` may touch `_items`.
    """

    __slots__ = ("_items", "_length")

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._items: list[Event] = list(events)
        self._length = len(self._items)

    def appended(self, event: Event) -> History:
        # The empty history is every new state's default: never extend its list in place.
        if self._length == 0 or self._length != len(self._items):
            return History((*self, event))
        self._items.append(event)
        grown = History.__new__(History)
        grown._items, grown._length = self._items, self._length + 1
        return grown

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Event: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Event, ...]: ...
    def __getitem__(self, index: int | slice) -> Event | tuple[Event, ...]:
        if isinstance(index, slice):
            return tuple(self._items[: self._length][index])
        if not -self._length <= index < self._length:
            raise IndexError("history index out of range")
        return self._items[index % self._length]

    def __iter__(self) -> Iterator[Event]:
        return itertools.islice(self._items, self._length)

    def __reversed__(self) -> Iterator[Event]:
        return (self._items[i] for i in range(self._length - 1, -1, -1))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            if other._items is self._items:  # one list: equal iff the same prefix
                return other._length == self._length
            return other._length == self._length and all(
                a == b for a, b in zip(self, other, strict=True)
            )
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"History({list(self)!r})"


class ConversationState(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    last_event_id: int = -1
    # The last event other than a measurement: what a decision taken on this state rests on.
    last_decisive_event_id: int = -1
    last_activity: datetime | None = None
    created: bool = False
    user_id: str = ""
    spec: ConversationSpec = ConversationSpec()
    title: str = ""
    created_at: datetime | None = None
    status: ConversationStatus | None = None
    status_reason: str = ""
    status_since: datetime | None = None
    started_at: datetime | None = None  # the latest STARTING: max_duration_seconds counts from it
    agent_state: AgentState | None = None
    agent_state_reason: str = ""
    agent_state_event_id: int = -1
    runtime_status: RuntimeStatus | None = None
    # A resume the runner has not answered yet: until it has, the sandbox may still be frozen.
    pending_resume_id: int | None = None
    runtime_reason: str = ""
    workspace: str = ""
    # The runner the latest sandbox was placed on (its RuntimeRequested).
    runner_id: str | None = None
    # What the LLM sees: messages, the agent's actions and their observations, in log order.
    history: History = History()
    # The agent's latest action still waiting for its answer (an observation or a state change).
    open_action: Event | None = None
    # Confirmation mode: a risky action waiting for the user, and the user's answer once given.
    pending_action: ActionProposed | None = None
    confirmation: bool | None = None
    # Tool calls of one LLM response still to run, and how many of them are released already.
    tool_queue: ToolCallsQueued | None = None
    tool_calls_released: int = 0
    last_user_message_id: int = -1
    task_list: tuple[TaskItem, ...] = ()
    # The tools the sandbox's MCP servers offer (its latest `MCPToolsListed`).
    mcp_tools: tuple[MCPTool, ...] = ()
    iterations: int = 0
    iteration_limit: int | None = None
    accumulated_cost: float = 0.0
    budget_limit: float | None = None
    deleted: bool = False
    # What the conversations it `depends_on` came to, once they all ended (see dependencies).
    dependencies: DependenciesResolved | None = None


def fold(conversation_id: str, events: Iterable[Event | UnknownEvent]) -> ConversationState:
    state = ConversationState(conversation_id=conversation_id)
    for event in events:
        state = apply(state, event)
    return state


def apply(state: ConversationState, event: Event | UnknownEvent) -> ConversationState:
    """The state after `event`; events already applied are ignored."""
    if event.id <= state.last_event_id:
        return state
    if isinstance(event, MEASUREMENTS):  # no activity: `last_activity` stays
        return msgspec.structs.replace(state, last_event_id=event.id)
    if isinstance(event, UnknownEvent):  # of a newer version: maybe decisive, so counted so
        return msgspec.structs.replace(
            state, last_event_id=event.id, last_decisive_event_id=event.id
        )
    state = msgspec.structs.replace(
        state,
        last_event_id=event.id,
        last_decisive_event_id=event.id,
        last_activity=event.timestamp,
    )
    pending = state.pending_action
    if (
        pending is not None
        and event.cause == pending.id
        and isinstance(event, (*EXECUTABLE_ACTIONS, ErrorObservation))
    ):
        # The confirmed action itself, or the observation that records its rejection.
        state = msgspec.structs.replace(state, pending_action=None, confirmation=None)
    queue = state.tool_queue
    if queue is not None and event.cause == queue.id:
        # Released from the queue: an action, its proposal, or the error of a malformed call.
        released = state.tool_calls_released + 1
        state = msgspec.structs.replace(
            state,
            tool_queue=queue if released < len(queue.calls) else None,
            tool_calls_released=released,
        )
    return _apply_payload(state, event)


def _apply_payload(state: ConversationState, event: Event) -> ConversationState:
    replace = msgspec.structs.replace
    match event:
        case ConversationCreated():
            return replace(
                state,
                created=True,
                user_id=event.user_id,
                spec=event.spec,
                title=event.title,
                created_at=event.timestamp,
                iteration_limit=event.spec.max_iterations,
                budget_limit=event.spec.max_budget_per_task,
            )
        case ConversationStatusChanged():
            starting = event.status == ConversationStatus.STARTING
            return replace(
                state,
                status=event.status,
                status_reason=event.reason,
                status_since=event.timestamp,
                started_at=event.timestamp if starting else state.started_at,
            )
        case AgentStateChanged():
            open_action = state.open_action
            if event.agent_state != AgentState.RUNNING and not isinstance(
                open_action, EXECUTABLE_ACTIONS
            ):
                open_action = None  # finish / agent message are answered by this change
            tool_queue = state.tool_queue if event.agent_state in _WORKING else None
            return replace(
                state,
                agent_state=event.agent_state,
                agent_state_reason=event.reason,
                agent_state_event_id=event.id,
                open_action=open_action,
                tool_queue=tool_queue,
            )
        case ConversationDeleted():
            return replace(state, deleted=True)
        case ConversationRenamed():
            return replace(state, title=event.title)
        case RuntimeRequested():
            # A new sandbox: nothing will ever answer an action sent to the previous one, and a
            # proposal for the previous one is void.
            return replace(
                state,
                runner_id=event.runner_id,
                runtime_status=None,
                runtime_reason="",
                open_action=None,
                pending_action=None,
                confirmation=None,
                tool_queue=None,
                pending_resume_id=None,
                mcp_tools=(),
            )
        case RuntimeLost():
            return replace(state, runtime_status=RuntimeStatus.ERROR, runtime_reason=event.reason)
        case MCPToolsListed():
            return replace(state, mcp_tools=tuple(event.tools))
        case ToolCallsQueued():
            return replace(state, tool_queue=event, tool_calls_released=0)
        case ActionProposed():
            return replace(state, pending_action=event, confirmation=None)
        case ConfirmationGiven():
            return _apply_confirmation(state, event)
        case CondensationAction():
            return replace(state, history=condensed(state.history, event))
        case RuntimeControlRequested():
            resume = event.action == RuntimeControl.RESUME
            return replace(state, pending_resume_id=event.id if resume else None)
        case RuntimeStatusChanged():
            return replace(
                state,
                runtime_status=event.status,
                runtime_reason=event.reason,
                workspace=event.workspace or state.workspace,
                pending_resume_id=None,
            )
        case MessageAction():
            return _apply_message(state, event)
        case LLMMetrics():
            return replace(
                state,
                iterations=state.iterations + 1,
                accumulated_cost=state.accumulated_cost + event.cost,
            )
        case DependenciesResolved():
            return replace(state, dependencies=event)
        case TaskTrackingAction():
            # A plan `plan_problem` refuses is answered with an error and not applied.
            applies = event.command == "plan" and plan_problem(event.task_list) is None
            task_list = tuple(event.task_list) if applies else state.task_list
            return replace(
                state,
                history=state.history.appended(event),
                open_action=event,
                task_list=task_list,
            )
        case ThinkAction():
            return replace(state, history=state.history.appended(event))
        case _ if isinstance(event, AGENT_ACTIONS):
            return replace(state, history=state.history.appended(event), open_action=event)
        case _ if isinstance(event, OBSERVATIONS):
            open_action = state.open_action
            if open_action is not None and event.cause == open_action.id:
                open_action = None
            pending_resume_id = state.pending_resume_id
            if event.cause is not None and event.cause == pending_resume_id:
                pending_resume_id = None  # the runner could not resume the sandbox
            return replace(
                state,
                history=state.history.appended(event),
                open_action=open_action,
                pending_resume_id=pending_resume_id,
            )
    return state


def _apply_confirmation(state: ConversationState, event: ConfirmationGiven) -> ConversationState:
    pending = state.pending_action
    if pending is None or event.action_id != pending.id or state.confirmation is not None:
        return state
    if event.confirmed:
        return msgspec.structs.replace(state, confirmation=True)
    # A rejected proposal stays in the LLM's history, answered by the rejection's observation.
    return msgspec.structs.replace(
        state, confirmation=False, history=state.history.appended(pending)
    )


def condensed(history: History, condensation: CondensationAction) -> History:
    """`history` without the events whose ids lie in the condensation's range (earlier
    condensations included), with the condensation standing in their place."""
    start, end = condensation.forgotten_start_id, condensation.forgotten_end_id

    def forgotten(event: Event) -> bool:
        if isinstance(event, CondensationAction):
            return start <= event.forgotten_start_id and event.forgotten_end_id <= end
        return start <= event.id <= end

    kept: list[Event] = []
    for event in history:
        if not forgotten(event):
            kept.append(event)
        elif condensation not in kept:
            kept.append(condensation)
    return History(kept) if condensation in kept else history


def _apply_message(state: ConversationState, event: MessageAction) -> ConversationState:
    history = state.history.appended(event)
    if event.source != EventSource.USER:
        return msgspec.structs.replace(state, history=history, open_action=event)
    # A user message after a limit was hit extends that limit by its initial amount.
    iteration_limit = state.iteration_limit
    initial_iterations = state.spec.max_iterations
    if (
        iteration_limit is not None
        and initial_iterations is not None
        and state.iterations >= iteration_limit
    ):
        iteration_limit += initial_iterations
    budget_limit = state.budget_limit
    initial_budget = state.spec.max_budget_per_task
    if (
        budget_limit is not None
        and initial_budget is not None
        and state.accumulated_cost >= budget_limit
    ):
        budget_limit += initial_budget
    return msgspec.structs.replace(
        state,
        history=history,
        last_user_message_id=event.id,
        iteration_limit=iteration_limit,
        budget_limit=budget_limit,
    )


def limit_reached(state: ConversationState) -> str | None:
    """The limit that forbids another LLM call, if any (OpenHands' control flags)."""
    if state.iteration_limit is not None and state.iterations >= state.iteration_limit:
        return "max_iterations"
    if state.budget_limit is not None and state.accumulated_cost >= state.budget_limit:
        return "budget_exceeded"
    return None


def holds_slot(state: ConversationState) -> bool:
    """Whether the conversation counts against concurrency limits."""
    return state.status in ACTIVE_STATUSES
