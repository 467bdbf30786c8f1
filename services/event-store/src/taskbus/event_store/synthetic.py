"""Realistic synthetic conversations, for the event-store's tests and its benchmark.

Each history is what session-manager and runtime-runner would log for one task: creation,
start-up, agent steps (an LLM call with its cost, then a command, an edit or a thought, with the
observation), and an outcome (finished, error, stopped, still running, sometimes deleted).
Deterministic for a given `random.Random`, so a failing test can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta

from taskbus.contracts.events import (
    AgentFinishAction,
    AgentStateChanged,
    CmdOutputChunk,
    CmdOutputObservation,
    CmdRunAction,
    CommandTimeout,
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    Event,
    EventSource,
    FileEditAction,
    FileEditObservation,
    LLMMetrics,
    MessageAction,
    RuntimeRequested,
    RuntimeStatusChanged,
    ThinkAction,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus

USER, AGENT, ENV = EventSource.USER, EventSource.AGENT, EventSource.ENVIRONMENT

MODELS = ("openai/gpt-4o", "anthropic/claude-sonnet-4", "openai/scripted")
REPOSITORIES = ("octo/app", "octo/lib", "acme/api", "acme/web")
# (command, how often it fails, the exit code when it does)
COMMANDS: tuple[tuple[str, float, int], ...] = (
    ("pytest -q", 0.4, 1),
    ("npm test", 0.3, 1),
    ("make build", 0.2, 2),
    ("python -m mypy .", 0.5, 1),
    ("git status", 0.0, 0),
    ("ls -la", 0.0, 0),
    ("cat README.md", 0.05, 1),
    ("cargo build", 0.3, 101),
)
OUTCOMES: tuple[tuple[ConversationStatus, str], ...] = (
    (ConversationStatus.FINISHED, "finished"),
    (ConversationStatus.FINISHED, "finished"),
    (ConversationStatus.FINISHED, "finished"),
    (ConversationStatus.ERROR, "budget exceeded"),
    (ConversationStatus.ERROR, "max iterations reached"),
    (ConversationStatus.STOPPED, "stopped by user"),
    (ConversationStatus.RUNNING, ""),  # still at work
)


def conversation_history(
    rng: random.Random,
    conversation_id: str,
    user_id: str,
    start: datetime,
    *,
    steps: int,
    deleted: bool = False,
) -> list[Event]:
    """One conversation with `steps` agent steps; timestamps grow from `start`."""
    clock = _Clock(rng, start)
    cid = conversation_id
    title = f"Task {cid}: fix the {rng.choice(['login', 'cache', 'parser', 'build'])} bug"
    repository = rng.choice(REPOSITORIES)
    model = rng.choice(MODELS)
    events: list[Event] = [
        ConversationCreated(
            conversation_id=cid,
            source=USER,
            timestamp=clock.now(),
            user_id=user_id,
            title=title,
            spec=ConversationSpec(
                initial_user_msg=title, repository=repository, priority=rng.randint(-2, 2)
            ),
        ),
        _status(cid, clock.tick(), ConversationStatus.STARTING),
        MessageAction(conversation_id=cid, source=USER, timestamp=clock.tick(), content=title),
        RuntimeRequested(
            conversation_id=cid,
            source=AGENT,
            timestamp=clock.tick(),
            user_id=user_id,
            repository=repository,
        ),
        RuntimeStatusChanged(
            conversation_id=cid, source=ENV, timestamp=clock.tick(), status=RuntimeStatus.READY
        ),
        _status(cid, clock.tick(), ConversationStatus.RUNNING),
        AgentStateChanged(
            conversation_id=cid, source=ENV, timestamp=clock.tick(), agent_state=AgentState.RUNNING
        ),
    ]
    accumulated = 0.0
    for _ in range(steps):
        prompt, completion = rng.randint(500, 20_000), rng.randint(20, 800)
        cost = round(prompt * 2.5e-6 + completion * 1e-5, 6)
        accumulated += cost
        events.append(
            LLMMetrics(
                conversation_id=cid,
                source=AGENT,
                timestamp=clock.tick(),
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost=cost,
                accumulated_cost=accumulated,
            )
        )
        events += _agent_step(rng, cid, clock)
    status, reason = rng.choice(OUTCOMES)
    if status is ConversationStatus.FINISHED:
        events += [
            AgentFinishAction(
                conversation_id=cid, source=AGENT, timestamp=clock.tick(), final_thought="done"
            ),
            AgentStateChanged(
                conversation_id=cid,
                source=ENV,
                timestamp=clock.tick(),
                agent_state=AgentState.FINISHED,
            ),
        ]
    if status is not ConversationStatus.RUNNING:
        events.append(_status(cid, clock.tick(), status, reason))
    if deleted:
        events += [
            ConversationDeleted(
                conversation_id=cid, source=USER, timestamp=clock.tick(), reason="deleted"
            ),
            _status(cid, clock.tick(), ConversationStatus.ARCHIVED, "deleted"),
        ]
    return events


def _agent_step(rng: random.Random, cid: str, clock: _Clock) -> list[Event]:
    choice = rng.random()
    if choice < 0.6:
        command, failure_rate, failure_code = rng.choice(COMMANDS)
        failed = rng.random() < failure_rate
        soft_timeout = not failed and rng.random() < 0.05
        output = f"{command}: {'FAILED' if failed else 'ok'}\n" + "log line\n" * rng.randint(1, 20)
        return [
            CmdRunAction(
                conversation_id=cid,
                source=AGENT,
                timestamp=clock.tick(),
                command=command,
                thought=f"Let me run {command}",
            ),
            CmdOutputChunk(
                conversation_id=cid, source=ENV, timestamp=clock.tick(), content=output[:40]
            ),
            CmdOutputObservation(
                conversation_id=cid,
                source=ENV,
                timestamp=clock.tick(),
                command=command,
                content=output,
                exit_code=-1 if soft_timeout else (failure_code if failed else 0),
                timed_out=CommandTimeout.SOFT if soft_timeout else CommandTimeout.NONE,
            ),
        ]
    if choice < 0.85:
        path = f"/workspace/src/module_{rng.randint(0, 30)}.py"
        return [
            FileEditAction(
                conversation_id=cid,
                source=AGENT,
                timestamp=clock.tick(),
                command="str_replace",
                path=path,
                old_str="return None",
                new_str="return value",
            ),
            FileEditObservation(
                conversation_id=cid,
                source=ENV,
                timestamp=clock.tick(),
                path=path,
                content=f"The file {path} has been edited.",
                diff="-    return None\n+    return value\n",
            ),
        ]
    return [
        ThinkAction(
            conversation_id=cid,
            source=AGENT,
            timestamp=clock.tick(),
            thought="The failure comes from the cache key; check the parser next.",
        )
    ]


def _status(
    cid: str, at: datetime, status: ConversationStatus, reason: str = ""
) -> ConversationStatusChanged:
    return ConversationStatusChanged(
        conversation_id=cid, source=ENV, timestamp=at, status=status, reason=reason
    )


class _Clock:
    """Time that moves forward by a realistic, random step per event (whole milliseconds)."""

    def __init__(self, rng: random.Random, start: datetime) -> None:
        self._rng = rng
        self._now = start

    def now(self) -> datetime:
        return self._now

    def tick(self) -> datetime:
        self._now += timedelta(milliseconds=self._rng.randint(50, 30_000))
        return self._now


def users_history(
    rng: random.Random,
    user_ids: Sequence[str],
    conversations_per_user: int,
    start: datetime,
    *,
    max_steps: int,
    id_prefix: str,
) -> list[list[Event]]:
    """Several users' conversations, created minutes to hours apart; about one in eight deleted."""
    histories: list[list[Event]] = []
    for user_id in user_ids:
        for n in range(conversations_per_user):
            created = start + timedelta(minutes=rng.randint(0, 3 * 24 * 60))
            histories.append(
                conversation_history(
                    rng,
                    f"{id_prefix}-{user_id}-{n}",
                    user_id,
                    created,
                    steps=rng.randint(0, max_steps),
                    deleted=rng.random() < 0.125,
                )
            )
    return histories
