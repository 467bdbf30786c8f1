"""Admission: which conversations may hold a sandbox now. Pure; the service supplies the facts.

Per user, at most `max_concurrent` conversations run; past that, policy `evict_oldest` stops the
user's least recently active one (OpenHands' behaviour) and `queue` makes the new one wait.
Eviction never stops a conversation of higher priority than the one admitted: the lowest
priority goes first, and when only higher ones run the new one waits instead.
Across users, `max_running` caps sandboxes. Waiting conversations go in order of priority
(higher first), then age. A user's own settings never lift these past the operator's maxima:
their concurrency is capped, and past `max_queued` waiting conversations a new one is refused.
A conversation waiting for its dependencies (see `dependencies`) is queued and counts against
`max_queued`, but is not admitted until they have ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import msgspec

from taskbus.contracts.specs import ConcurrencyPolicy, UserSettings
from taskbus.session_manager.settings import SessionManagerSettings

EVICTION_REASON = "too_many_conversations"
QUEUE_FULL_REASON = "queue_full"


class Running(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    user_id: str
    last_activity: datetime
    priority: int = 0


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    user_id: str
    priority: int
    since: datetime


class UserLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_concurrent: int
    policy: ConcurrencyPolicy
    max_queued: int


def user_limits(user: UserSettings | None, settings: SessionManagerSettings) -> UserLimits:
    """The user's settings, else the operator's defaults, within the operator's maxima."""
    user = user or UserSettings()
    wanted = user.max_concurrent_conversations or settings.max_concurrent_conversations
    return UserLimits(
        max_concurrent=min(wanted, settings.max_concurrent_conversations_limit),
        policy=user.concurrency_policy or settings.concurrency_policy,
        max_queued=settings.max_queued_conversations,
    )


class Admit(msgspec.Struct, frozen=True, kw_only=True):
    evict: tuple[str, ...] = ()


class Queue(msgspec.Struct, frozen=True, kw_only=True):
    # EVICTION_REASON (user limit under the queue policy), "capacity", or
    # WAITING_FOR_DEPENDENCIES (its dependencies have not ended)
    reason: str


class Reject(msgspec.Struct, frozen=True, kw_only=True):
    reason: str  # QUEUE_FULL_REASON
    detail: str


def admit(
    user_id: str,
    running: Sequence[Running],
    limits: UserLimits,
    max_running: int,
    priority: int = 0,
) -> Admit | Queue:
    """Decide for one conversation of `user_id` and `priority` given what runs now."""
    mine = [r for r in running if r.user_id == user_id]
    excess = len(mine) - limits.max_concurrent + 1
    evict: list[Running] = []
    if excess > 0:
        evictable = sorted(
            (r for r in mine if r.priority <= priority),
            key=lambda r: (r.priority, r.last_activity),
        )
        if limits.policy == ConcurrencyPolicy.QUEUE or len(evictable) < excess:
            return Queue(reason=EVICTION_REASON)
        evict = evictable[:excess]
    if len(running) - len(evict) >= max_running:
        return Queue(reason="capacity")
    return Admit(evict=tuple(r.conversation_id for r in evict))


def admit_new(
    user_id: str,
    running: Sequence[Running],
    queued: int,
    limits: UserLimits,
    max_running: int,
    priority: int = 0,
) -> Admit | Queue | Reject:
    """Decide for a conversation that is not waiting yet, `queued` being how many of the user's
    already wait: one that would wait beyond the user's queue limit is refused instead."""
    return queue_limited(admit(user_id, running, limits, max_running, priority), queued, limits)


def queue_limited(
    decision: Admit | Queue, queued: int, limits: UserLimits
) -> Admit | Queue | Reject:
    """`decision` for a conversation not waiting yet, unless it would wait beyond the user's
    queue limit (`queued` of the user's already wait): then it is refused."""
    if isinstance(decision, Queue) and queued >= limits.max_queued:
        return Reject(
            reason=QUEUE_FULL_REASON,
            detail=(
                f"you already have {queued} queued conversations, the most this server allows; "
                "stop or delete one, or wait until one starts"
            ),
        )
    return decision


def admit_waiting(
    waiting: Sequence[Waiting],
    running: Sequence[Running],
    limits_of: Callable[[str], UserLimits],
    max_running: int,
    now: datetime,
) -> list[tuple[Waiting, Admit]]:
    """Which waiting conversations start now, in queue order, and whom each one evicts."""
    started: list[tuple[Waiting, Admit]] = []
    current = list(running)
    for candidate in sorted(waiting, key=lambda w: (-w.priority, w.since, w.conversation_id)):
        decision = admit(
            candidate.user_id,
            current,
            limits_of(candidate.user_id),
            max_running,
            candidate.priority,
        )
        if isinstance(decision, Queue):
            continue  # a later one may still fit, e.g. by evicting its own user's oldest
        started.append((candidate, decision))
        current = [r for r in current if r.conversation_id not in decision.evict]
        current.append(
            Running(
                conversation_id=candidate.conversation_id,
                user_id=candidate.user_id,
                last_activity=now,
                priority=candidate.priority,
            )
        )
    return started
