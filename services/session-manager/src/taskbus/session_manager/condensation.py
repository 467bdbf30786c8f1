"""History condensation: when the prompt would not fit the model's context, the middle of the
history is replaced by a summary. Pure; the caller supplies the token counter.

The first user message (the task) and the most recent events are always kept. Enough is forgotten
to bring the prompt to half the limit, so condensation happens once in a while rather than at every
step. The summary is written from the forgotten events themselves (no extra LLM call): what the
user said, which commands ran with which exit codes, which files were touched, and the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from taskbus.contracts.events import (
    CmdOutputObservation,
    CondensationAction,
    Event,
    EventSource,
    MessageAction,
    TaskTrackingAction,
)
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.state import OBSERVATIONS, ConversationState, condensed
from taskbus.session_manager.tools import render_task_list, tool_call_of

TokenCounter = Callable[[list[dict[str, Any]]], int]

MAX_SUMMARY_LINES = 40
_PLAN_HEADING = "Current plan:"
_QUOTE_CHARS = 120


def plan_condensation(
    state: ConversationState, count_tokens: TokenCounter, max_tokens: int, keep_recent: int
) -> CondensationAction | None:
    """The condensation to append before the next LLM call, or None if the prompt fits (or
    nothing more can be forgotten)."""
    if count_tokens(to_messages(state)) <= max_tokens:
        return None
    history = state.history
    first = next(
        (
            i
            for i, e in enumerate(history)
            if isinstance(e, MessageAction) and e.source == EventSource.USER
        ),
        -1,
    )
    start = first + 1
    # The kept part begins at a turn (not an orphaned observation).
    ends = [
        i
        for i in range(start + 1, len(history) - keep_recent + 1)
        if not isinstance(history[i], OBSERVATIONS)
    ]
    # Forgetting only an earlier summary again gains nothing.
    ends = [i for i in ends if any(not isinstance(e, CondensationAction) for e in history[start:i])]
    if not ends:
        return None

    def candidate(end: int) -> CondensationAction:
        forgotten = history[start:end]
        return CondensationAction(
            conversation_id=state.conversation_id,
            source=EventSource.AGENT,
            forgotten_start_id=_first_id(forgotten[0]),
            forgotten_end_id=_last_id(forgotten[-1]),
            summary=summarize(forgotten, state),
        )

    def fits(end: int) -> bool:
        condensation = msgspec.structs.replace(candidate(end), id=state.last_event_id + 1)
        shorter = msgspec.structs.replace(state, history=condensed(history, condensation))
        return count_tokens(to_messages(shorter)) <= max_tokens // 2

    # Forgetting more never lengthens the prompt: find the least that fits, else forget all.
    low, high = 0, len(ends) - 1
    while low < high:
        middle = (low + high) // 2
        if fits(ends[middle]):
            high = middle
        else:
            low = middle + 1
    return candidate(ends[low])


def summarize(forgotten: tuple[Event, ...], state: ConversationState) -> str:
    """A short account of the forgotten events for the LLM."""
    lines = [f"[{len(forgotten)} earlier events were condensed to fit the context. Summary:]"]
    results = {e.cause: e for e in forgotten if isinstance(e, CmdOutputObservation)}
    for event in forgotten:
        if isinstance(event, CondensationAction):
            earlier = event.summary.split(_PLAN_HEADING)[0]  # the plan is restated below
            lines.extend(earlier.splitlines()[1:])
        elif isinstance(event, MessageAction):
            who = "The user" if event.source == EventSource.USER else "You"
            lines.append(f"- {who} said: {_quote(event.content)}")
        elif isinstance(event, TaskTrackingAction):
            lines.append("- You updated the plan.")  # the current plan is restated below
        elif (call := tool_call_of(event)) is not None:
            name, arguments = call
            line = f"- You called {name} {_quote(str(arguments))}"
            output = results.get(event.id)
            if output is not None:
                line += f" (exit code {output.exit_code})"
            lines.append(line)
    if len(lines) > MAX_SUMMARY_LINES + 1:
        omitted = len(lines) - MAX_SUMMARY_LINES - 1
        lines = [lines[0], f"- ({omitted} older steps omitted)", *lines[-MAX_SUMMARY_LINES:]]
    if state.task_list:
        lines.append(f"{_PLAN_HEADING}\n{render_task_list(state.task_list)}")
    return "\n".join(lines)


def _first_id(event: Event) -> int:
    return event.forgotten_start_id if isinstance(event, CondensationAction) else event.id


def _last_id(event: Event) -> int:
    return event.forgotten_end_id if isinstance(event, CondensationAction) else event.id


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"
