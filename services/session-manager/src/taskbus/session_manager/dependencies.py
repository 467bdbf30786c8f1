"""Task dependencies, pure: when a conversation that `depends_on` others may start (all of them
FINISHED) or must fail (one ended in ERROR or STOPPED, or is gone), what they came to, how the
agent reads that; and the checks of a task plan whose items name `depends_on`.

A dependency's outcome is read from its current state, not from the event that ended it, so the
decision is the same whether it is taken when a dependency ends, when the dependent is created
after its dependencies ended, or after a restart: the dependent's own log records it once
(`DependenciesResolved`), and a conversation with that record never waits again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskbus.contracts.dependency_graph import find_cycle
from taskbus.contracts.events import (
    AgentFinishAction,
    DependenciesResolved,
    DependencyOutcome,
    EventSource,
    MessageAction,
    TaskItem,
)
from taskbus.contracts.status import ConversationStatus

if TYPE_CHECKING:  # state.py folds plans with `plan_problem`, so it is imported for types only
    from taskbus.session_manager.state import ConversationState

WAITING_FOR_DEPENDENCIES = "waiting_for_dependencies"
DEPENDENCY_FAILED = "dependency_failed"
INVALID_TASK_PLAN = "invalid_task_plan"
# A dependency's final message as the dependent's agent reads it (32 of them fit a prompt).
MAX_FINAL_MESSAGE_CHARS = 1000

_S = ConversationStatus
# A dependency in one of these will never FINISH for this dependent: it fails at once.
# ARCHIVED stands for a deleted conversation, and for one that is not the same user's.
_FAILED = frozenset({_S.ERROR, _S.STOPPED, _S.ARCHIVED})


def unresolved(state: ConversationState) -> bool:
    """It names dependencies and has not had their outcome yet: admission must not start it."""
    return bool(state.spec.depends_on) and state.dependencies is None


def waits_for_dependencies(state: ConversationState) -> bool:
    """Queued until its dependencies end (holding no slot, never started by admission)."""
    return (
        state.created
        and not state.deleted
        and state.status == ConversationStatus.QUEUED
        and unresolved(state)
    )


def resolution(
    dependent: ConversationState, dependencies: Sequence[ConversationState]
) -> DependenciesResolved | None:
    """The outcome record once every dependency FINISHED, or (`failed`) once one ended
    otherwise; None while it still has to wait. `dependencies` are the states of
    `dependent.spec.depends_on`, in that order."""
    outcomes = [outcome_of(d, dependent.user_id) for d in dependencies]
    failed = any(o.status in _FAILED for o in outcomes)
    if not failed and any(o.status != _S.FINISHED for o in outcomes):
        return None
    return DependenciesResolved(
        conversation_id=dependent.conversation_id,
        source=EventSource.ENVIRONMENT,
        outcomes=outcomes,
        failed=failed,
    )


def outcome_of(dependency: ConversationState, user_id: str) -> DependencyOutcome:
    """What a dependency came to, as far as `user_id` may know: nothing of a deleted
    conversation or of another user's (ARCHIVED, as if it did not exist)."""
    cid = dependency.conversation_id
    if not dependency.created or dependency.deleted or dependency.user_id != user_id:
        return DependencyOutcome(conversation_id=cid, status=_S.ARCHIVED)
    return DependencyOutcome(
        conversation_id=cid,
        status=dependency.status or _S.QUEUED,
        title=dependency.title,
        final_message=final_message(dependency),
    )


def final_message(state: ConversationState) -> str:
    """The agent's last word: its finish summary or its latest message, shortened."""
    for event in reversed(state.history):
        if isinstance(event, AgentFinishAction):
            text = event.final_thought
        elif isinstance(event, MessageAction) and event.source == EventSource.AGENT:
            text = event.content
        else:
            continue
        text = text.strip()
        if len(text) > MAX_FINAL_MESSAGE_CHARS:
            text = text[: MAX_FINAL_MESSAGE_CHARS - 1].rstrip() + "…"
        return text
    return ""


def dependencies_context(resolved: DependenciesResolved) -> str:
    """The outcomes as the agent reads them (in its system prompt, so condensation keeps them)."""
    lines = ["This task comes after other tasks it depends on. What they came to:"]
    for outcome in resolved.outcomes:
        title = f"{outcome.title!r} " if outcome.title else ""
        line = f"- {title}(conversation {outcome.conversation_id}): {outcome.status.value}"
        if outcome.final_message:
            line += f". Final message: {outcome.final_message}"
        lines.append(line)
    return "\n".join(lines)


def plan_problem(tasks: Sequence[TaskItem]) -> str | None:
    """Why a task plan cannot be applied, or None: item ids must be unique, `depends_on` must
    name items of the plan without a cycle, and an item is done only once what it depends on
    is done."""
    status: dict[str, str] = {}
    for item in tasks:
        if item.id in status:
            return f"task ids must be unique, and {item.id!r} is used twice"
        status[item.id] = item.status
    for item in tasks:
        for needed in item.depends_on:
            if needed not in status:
                return f"task {item.id!r} depends on {needed!r}, which is not in the plan"
    cycle = find_cycle({item.id: item.depends_on for item in tasks})
    if cycle is not None:
        return "the tasks' dependencies form a cycle: " + " -> ".join(cycle)
    for item in tasks:
        if item.status != "done":
            continue
        for needed in item.depends_on:
            if status[needed] != "done":
                return (
                    f"task {item.id!r} cannot be done while {needed!r}, which it depends on, "
                    f"is {status[needed]}"
                )
    return None
