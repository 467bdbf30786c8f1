"""Admission: which conversations may hold a sandbox now. Pure; the service supplies the facts.

Per user, at most `max_concurrent` conversations run; past that, policy `evict_oldest` stops the
user's least recently active one (OpenHands' behaviour) and `queue` makes the new one wait.
Across users, `max_running` caps sandboxes. Waiting conversations go in order of priority
(higher first), then age.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import msgspec

from taskbus.contracts.specs import ConcurrencyPolicy

EVICTION_REASON = "too_many_conversations"


class Running(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    user_id: str
    last_activity: datetime


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: str
    user_id: str
    priority: int
    since: datetime


class UserLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_concurrent: int
    policy: ConcurrencyPolicy


class Admit(msgspec.Struct, frozen=True, kw_only=True):
    evict: tuple[str, ...] = ()


class Queue(msgspec.Struct, frozen=True, kw_only=True):
    reason: str  # EVICTION_REASON (user limit under the queue policy) or "capacity"


def admit(
    user_id: str, running: Sequence[Running], limits: UserLimits, max_running: int
) -> Admit | Queue:
    """Decide for one conversation of `user_id` given what runs now."""
    mine = sorted((r for r in running if r.user_id == user_id), key=lambda r: r.last_activity)
    excess = len(mine) - limits.max_concurrent + 1
    evict: list[Running] = []
    if excess > 0:
        if limits.policy == ConcurrencyPolicy.QUEUE:
            return Queue(reason=EVICTION_REASON)
        evict = mine[:excess]
    if len(running) - len(evict) >= max_running:
        return Queue(reason="capacity")
    return Admit(evict=tuple(r.conversation_id for r in evict))


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
        decision = admit(candidate.user_id, current, limits_of(candidate.user_id), max_running)
        if isinstance(decision, Queue):
            continue  # a later one may still fit, e.g. by evicting its own user's oldest
        started.append((candidate, decision))
        current = [r for r in current if r.conversation_id not in decision.evict]
        current.append(
            Running(
                conversation_id=candidate.conversation_id,
                user_id=candidate.user_id,
                last_activity=now,
            )
        )
    return started
