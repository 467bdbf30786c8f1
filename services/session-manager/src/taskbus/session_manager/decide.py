"""What a conversation needs next, decided from its folded state alone.

Because the decision depends only on the log, a restarted session-manager resumes exactly where
the previous one stopped: an action that already has its observation is never sent again, and an
interrupted multi-event step is completed by the rule that sees its first half.
"""

from __future__ import annotations

import enum

import msgspec

from taskbus.contracts.events import (
    EXECUTABLE_ACTIONS,
    ActionProposed,
    AgentFinishAction,
    AgentStateChanged,
    CmdRunAction,
    ConfirmationRequested,
    ConversationStatusChanged,
    ErrorObservation,
    Event,
    EventSource,
    FileEditAction,
    FileWriteAction,
    MCPAction,
    MessageAction,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeLost,
    RuntimeRequested,
    TaskTrackingAction,
    TaskTrackingObservation,
    ToolCallsQueued,
    utc_now,
)
from taskbus.contracts.status import (
    ENDED_STATUSES,
    LIVE_RUNTIME_STATUSES,
    SETTLED_STATUSES,
    AgentState,
    ConversationStatus,
    RuntimeStatus,
)
from taskbus.session_manager.dependencies import INVALID_TASK_PLAN, plan_problem
from taskbus.session_manager.state import ConversationState, limit_reached
from taskbus.session_manager.tools import event_for_call, render_task_list

# The status reason of a conversation paused because nobody used it for `idle_seconds`.
IDLE_REASON = "idle"
# The status reason (and error code) when the runner holding the sandbox is gone.
RUNTIME_LOST_REASON = "runtime_lost"


# Statuses in which the conversation needs its sandbox.
_RUNTIME_NEEDED = frozenset(
    {ConversationStatus.STARTING, ConversationStatus.RUNNING, ConversationStatus.PAUSED}
)


class Step(enum.Enum):
    WAIT = "wait"  # nothing to do until another event arrives
    CALL_LLM = "call_llm"
    READMIT = "readmit"  # needs a sandbox again: goes through admission


_S = ConversationStatus
_A = AgentState

REJECTED_ACTION_MESSAGE = "The user rejected this action, so it was not run."
REJECTED_BY_MESSAGE = (
    "The user answered with a message instead of confirming, so this action was not run."
)


def next_step(state: ConversationState) -> Step | list[Event]:
    """`Step`, or the events to append now."""
    if state.deleted or not state.created or state.status is None:
        return Step.WAIT
    match state.status:
        case _S.STARTING:
            return _starting(state)
        case _S.PAUSED:
            return _paused(state)
        case _S.QUEUED | _S.ARCHIVED:
            return Step.WAIT
        case status if status in ENDED_STATUSES:
            return _ended(state)
    return _running(state)


def is_settled(state: ConversationState) -> bool:
    """Ended, holding no sandbox, and nothing to do until a new event or command arrives: the
    service may forget its state and fold it from the log again when it is needed."""
    return (
        state.status in SETTLED_STATUSES
        and state.runtime_status not in LIVE_RUNTIME_STATUSES
        and not awaits_cleanup(state)
        and next_step(state) is Step.WAIT
    )


def awaits_cleanup(state: ConversationState) -> bool:
    """A failed conversation becomes STOPPED (reason `cleanup`) after its idle limit, as the
    seed's Error -> cleanup -> Stopped: until then it is watched."""
    return (
        state.status == _S.ERROR
        and not state.deleted
        and state.spec.timeouts.idle_seconds is not None
    )


def _user_is_waiting(state: ConversationState) -> bool:
    return state.last_user_message_id > state.agent_state_event_id


def _paused(state: ConversationState) -> Step | list[Event]:
    """A conversation paused for being idle wakes up when its user answers; one the user paused
    waits for an explicit resume."""
    returned = _user_is_waiting(state) or state.confirmation is not None
    if state.status_reason != IDLE_REASON or not returned:
        return Step.WAIT
    return [
        runtime_control_event(state, RuntimeControl.RESUME, "user_returned"),
        status_event(state, _S.RUNNING, "user_returned"),
        agent_state_event(state, _A.RUNNING),
    ]


def _starting(state: ConversationState) -> Step | list[Event]:
    if state.runtime_status == RuntimeStatus.READY:
        return [status_event(state, _S.RUNNING), agent_state_event(state, _A.RUNNING)]
    if state.runtime_status == RuntimeStatus.ERROR:
        reason = state.runtime_reason or "runtime_error"
        return [agent_state_event(state, _A.ERROR, reason), status_event(state, _S.ERROR, reason)]
    return Step.WAIT


def _ended(state: ConversationState) -> Step | list[Event]:
    """Stopped, finished or failed: a new user message continues the conversation."""
    if not _user_is_waiting(state):
        return Step.WAIT
    if state.status == _S.STOPPED or state.runtime_status != RuntimeStatus.READY:
        return Step.READMIT
    return [status_event(state, _S.RUNNING, "user_message"), agent_state_event(state, _A.RUNNING)]


def _running(state: ConversationState) -> Step | list[Event]:
    if state.pending_resume_id is not None:
        return Step.WAIT  # the sandbox may still be frozen: actions would bounce
    agent = state.agent_state
    if state.pending_action is not None:
        return _confirmation(state, state.pending_action)
    if agent in (_A.FINISHED, _A.ERROR, _A.AWAITING_USER_INPUT, _A.USER_REJECTED):
        if _user_is_waiting(state):
            return [agent_state_event(state, _A.RUNNING)]
        if agent == _A.FINISHED:
            return [status_event(state, _S.FINISHED)]
        if agent == _A.ERROR:
            return [status_event(state, _S.ERROR, state.agent_state_reason)]
        return Step.WAIT
    if agent not in (_A.RUNNING, _A.RATE_LIMITED):  # rate-limited: running, between retries
        return [agent_state_event(state, _A.RUNNING)]  # the conversation status is what counts
    action = state.open_action
    if isinstance(action, EXECUTABLE_ACTIONS):
        return Step.WAIT  # runtime-runner answers with the observation
    if isinstance(action, TaskTrackingAction):
        return [_task_tracking_observation(state, action)]
    if isinstance(action, AgentFinishAction):
        return [agent_state_event(state, _A.FINISHED), status_event(state, _S.FINISHED)]
    if isinstance(action, MessageAction):
        return [agent_state_event(state, _A.AWAITING_USER_INPUT)]
    if state.tool_queue is not None:
        return [_next_queued_call(state, state.tool_queue)]
    reason = limit_reached(state)
    if reason is not None:
        return [agent_state_event(state, _A.ERROR, reason), status_event(state, _S.ERROR, reason)]
    return Step.CALL_LLM


def _next_queued_call(state: ConversationState, queue: ToolCallsQueued) -> Event:
    """The next call of a multi-call response, released once the previous one is answered; it is
    part of the LLM call already counted, so no limit is checked for it."""
    index = state.tool_calls_released
    thought = queue.thought if index == 0 else ""
    released = event_for_call(
        state.conversation_id, queue.calls[index], thought, queue.id, state.mcp_tools
    )
    return as_proposal(state, released)


def _confirmation(state: ConversationState, pending: ActionProposed) -> Step | list[Event]:
    """Ask once; on confirm, append the real action (now the runtime runs it); on reject, answer
    the proposal with an observation saying so and wait for the user, unless the user rejected
    it by sending a message: then the agent goes on with that message in view."""
    agent = state.agent_state
    if state.confirmation is None:
        if agent == _A.AWAITING_USER_CONFIRMATION:
            return Step.WAIT
        request = ConfirmationRequested(
            conversation_id=state.conversation_id,
            source=EventSource.AGENT,
            cause=pending.id,
            action_id=pending.id,
        )
        return [request, agent_state_event(state, _A.AWAITING_USER_CONFIRMATION)]
    events: list[Event] = []
    if state.confirmation:
        if agent == _A.AWAITING_USER_CONFIRMATION:
            events.append(agent_state_event(state, _A.USER_CONFIRMED))
        if agent != _A.RUNNING:
            events.append(agent_state_event(state, _A.RUNNING))
        action = msgspec.structs.replace(pending.proposed, cause=pending.id, timestamp=utc_now())
        return [*events, action]
    if agent != _A.USER_REJECTED:
        events.append(agent_state_event(state, _A.USER_REJECTED))
    by_message = state.last_user_message_id > pending.id
    rejected = ErrorObservation(
        conversation_id=state.conversation_id,
        source=EventSource.USER,
        cause=pending.id,
        content=REJECTED_BY_MESSAGE if by_message else REJECTED_ACTION_MESSAGE,
        code="action_rejected",
    )
    if by_message:
        return [*events, rejected, agent_state_event(state, _A.RUNNING, "user_message")]
    return [*events, rejected]


def as_proposal(state: ConversationState, action: Event) -> Event:
    """In confirmation mode a risky action (one that changes the sandbox) is only proposed, so
    the runtime never sees it; reads, thoughts and plans are not risky (an MCP tool may do
    anything)."""
    if not state.spec.confirmation_mode:
        return action
    match action:
        case CmdRunAction() | FileWriteAction() | MCPAction():
            pass
        case FileEditAction() if action.command != "view":
            pass
        case _:
            return action
    return ActionProposed(
        conversation_id=state.conversation_id,
        source=EventSource.AGENT,
        cause=action.cause,
        proposed=action,
    )


def start_events(state: ConversationState) -> list[Event]:
    """STARTING, the initial user message if not yet in the log, and the sandbox request."""
    cid = state.conversation_id
    events: list[Event] = [status_event(state, _S.STARTING)]
    if state.last_user_message_id < 0 and state.spec.initial_user_msg:
        events.append(
            MessageAction(
                conversation_id=cid,
                source=EventSource.USER,
                content=state.spec.initial_user_msg,
                image_urls=state.spec.image_urls,
            )
        )
    events.append(runtime_request(state))
    return events


def runtime_request(state: ConversationState) -> RuntimeRequested:
    """A sandbox as the conversation's spec asks; session-manager places it on a runner as it
    appends it (`runner_id`)."""
    return RuntimeRequested(
        conversation_id=state.conversation_id,
        source=EventSource.ENVIRONMENT,
        user_id=state.user_id,
        repository=state.spec.repository,
        selected_branch=state.spec.selected_branch,
        resources=state.spec.resources,
        timeouts=state.spec.timeouts,
        git_provider=state.spec.git_provider,
        mcp_config=state.spec.mcp_config,
    )


def runner_holding_sandbox(state: ConversationState) -> str | None:
    """The runner a sandbox of the conversation is placed on and may still be alive on."""
    if state.runtime_status in (RuntimeStatus.STOPPED, RuntimeStatus.ERROR):
        return None
    return state.runner_id


def runtime_lost_events(
    state: ConversationState, silent_seconds: float, shared_workspaces: bool
) -> list[Event]:
    """The runner holding the sandbox went silent: say so, answer the action it was running
    (it may or may not have run: it will not be run again), then start a new sandbox on another
    runner over the same workspace (on shared storage), or fail the conversation. An ended
    conversation only loses its sandbox: a new message starts another."""
    runner_id = runner_holding_sandbox(state)
    assert runner_id is not None
    cid = state.conversation_id
    restarts = shared_workspaces and state.status in _RUNTIME_NEEDED
    what = f"runner {runner_id} sent no heartbeat for {silent_seconds:.0f} s"
    then = (
        "restarted on another runner over the same workspace (shared storage)"
        if restarts
        else "its workspace is not on shared storage, so the conversation cannot continue"
    )
    events: list[Event] = [
        RuntimeLost(
            conversation_id=cid,
            source=EventSource.ENVIRONMENT,
            runner_id=runner_id,
            reason=f"{what}; {then}",
        )
    ]
    action = state.open_action
    if isinstance(action, EXECUTABLE_ACTIONS):
        events.append(
            ErrorObservation(
                conversation_id=cid,
                source=EventSource.ENVIRONMENT,
                cause=action.id,
                content=f"The sandbox was lost while this action ran ({what}); it may not have"
                " completed and was not run again.",
                code=RUNTIME_LOST_REASON,
            )
        )
    if state.status not in _RUNTIME_NEEDED:
        return events
    if restarts:
        return [*events, runtime_request(state)]
    return [
        *events,
        agent_state_event(state, _A.ERROR, RUNTIME_LOST_REASON),
        status_event(state, _S.ERROR, RUNTIME_LOST_REASON),
    ]


def _task_tracking_observation(state: ConversationState, action: TaskTrackingAction) -> Event:
    """The plan as it now stands, or why a new plan was not applied (the state kept the old)."""
    problem = plan_problem(action.task_list) if action.command == "plan" else None
    if problem is not None:
        return ErrorObservation(
            conversation_id=state.conversation_id,
            source=EventSource.ENVIRONMENT,
            cause=action.id,
            content=f"The plan was not applied: {problem}. Send the corrected plan.",
            code=INVALID_TASK_PLAN,
        )
    return TaskTrackingObservation(
        conversation_id=state.conversation_id,
        source=EventSource.ENVIRONMENT,
        cause=action.id,
        command=action.command,
        content=render_task_list(state.task_list),
        task_list=list(state.task_list),
    )


def status_event(
    state: ConversationState, status: ConversationStatus, reason: str = ""
) -> ConversationStatusChanged:
    return ConversationStatusChanged(
        conversation_id=state.conversation_id,
        source=EventSource.ENVIRONMENT,
        status=status,
        reason=reason,
    )


def runtime_control_event(
    state: ConversationState, action: RuntimeControl, reason: str
) -> RuntimeControlRequested:
    return RuntimeControlRequested(
        conversation_id=state.conversation_id,
        source=EventSource.ENVIRONMENT,
        action=action,
        reason=reason,
    )


def agent_state_event(
    state: ConversationState, agent_state: AgentState, reason: str = ""
) -> AgentStateChanged:
    return AgentStateChanged(
        conversation_id=state.conversation_id,
        source=EventSource.AGENT,
        agent_state=agent_state,
        reason=reason,
    )
