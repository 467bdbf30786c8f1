"""Admission: per-user limits with evict_oldest or queue, a global cap, queue order, and the
operator's maxima over what a user's settings ask for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from taskbus.contracts.specs import ConcurrencyPolicy, ConversationSpec, UserSettings
from taskbus.session_manager.admission import (
    EVICTION_REASON,
    QUEUE_FULL_REASON,
    Admit,
    Queue,
    Reject,
    Running,
    UserLimits,
    Waiting,
    admit,
    admit_new,
    admit_waiting,
    user_limits,
)
from taskbus.session_manager.service import effective_spec
from taskbus.session_manager.settings import SessionManagerSettings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EVICT = UserLimits(max_concurrent=2, policy=ConcurrencyPolicy.EVICT_OLDEST, max_queued=3)
QUEUE = UserLimits(max_concurrent=2, policy=ConcurrencyPolicy.QUEUE, max_queued=3)


def running(cid: str, user: str, minutes: int) -> Running:
    return Running(conversation_id=cid, user_id=user, last_activity=T0 + timedelta(minutes=minutes))


def waiting(cid: str, user: str, priority: int, minutes: int) -> Waiting:
    return Waiting(
        conversation_id=cid, user_id=user, priority=priority, since=T0 + timedelta(minutes=minutes)
    )


def test_room_for_the_user_and_globally_admits_without_eviction() -> None:
    assert admit("u", [running("a", "u", 0)], EVICT, max_running=8) == Admit()


def test_evict_oldest_stops_the_users_least_recently_active_conversation() -> None:
    current = [running("new", "u", 5), running("old", "u", 1), running("other", "v", 0)]
    assert admit("u", current, EVICT, max_running=8) == Admit(evict=("old",))


def test_queue_policy_waits_at_the_user_limit() -> None:
    current = [running("a", "u", 0), running("b", "u", 1)]
    assert admit("u", current, QUEUE, max_running=8) == Queue(reason=EVICTION_REASON)


def test_global_cap_queues_even_with_room_for_the_user() -> None:
    current = [running("a", "v", 0), running("b", "w", 0)]
    assert admit("u", current, EVICT, max_running=2) == Queue(reason="capacity")


def test_eviction_also_frees_a_global_slot() -> None:
    current = [running("a", "u", 0), running("b", "u", 1)]
    assert admit("u", current, EVICT, max_running=2) == Admit(evict=("a",))


def test_lowered_limit_evicts_as_many_as_needed() -> None:
    current = [running(c, "u", i) for i, c in enumerate("abc")]
    one = UserLimits(max_concurrent=1, policy=ConcurrencyPolicy.EVICT_OLDEST, max_queued=3)
    assert admit("u", current, one, max_running=8) == Admit(evict=("a", "b", "c"))


def test_waiting_start_by_priority_then_age_within_capacity() -> None:
    queue = [
        waiting("late-high", "u1", 5, 10),
        waiting("early-low", "u2", 0, 0),
        waiting("early-high", "u3", 5, 1),
    ]
    started = admit_waiting(queue, [], lambda _: EVICT, max_running=2, now=T0)
    assert [w.conversation_id for w, _ in started] == ["early-high", "late-high"]


def test_a_user_at_its_queue_limit_does_not_block_others() -> None:
    queue = [waiting("u-next", "u", 9, 0), waiting("v-next", "v", 0, 1)]
    current = [running("a", "u", 0), running("b", "u", 1)]
    started = admit_waiting(queue, current, lambda _: QUEUE, max_running=8, now=T0)
    assert [w.conversation_id for w, _ in started] == ["v-next"]


def test_admitted_conversations_count_against_later_ones() -> None:
    queue = [waiting("x", "u", 0, 0), waiting("y", "u", 0, 1), waiting("z", "u", 0, 2)]
    started = admit_waiting(queue, [], lambda _: QUEUE, max_running=8, now=T0)
    assert [w.conversation_id for w, _ in started] == ["x", "y"]


def test_a_new_conversation_past_the_users_queue_limit_is_rejected() -> None:
    full = [running("a", "v", 0), running("b", "w", 0)]
    assert admit_new("u", full, 2, EVICT, max_running=2) == Queue(reason="capacity")
    rejected = admit_new("u", full, 3, EVICT, max_running=2)
    assert isinstance(rejected, Reject) and rejected.reason == QUEUE_FULL_REASON
    assert "3 queued" in rejected.detail
    # A full queue does not refuse one that can start now.
    assert admit_new("u", [], 3, EVICT, max_running=2) == Admit()


OPERATOR = SessionManagerSettings(
    max_concurrent_conversations=3,
    max_concurrent_conversations_limit=4,
    max_priority=0,
    max_budget_per_task_limit=10.0,
    max_queued_conversations=5,
)


def test_user_settings_never_lift_concurrency_past_the_operator_maximum() -> None:
    greedy = UserSettings(
        max_concurrent_conversations=1000, concurrency_policy=ConcurrencyPolicy.QUEUE
    )
    assert user_limits(greedy, OPERATOR) == UserLimits(
        max_concurrent=4, policy=ConcurrencyPolicy.QUEUE, max_queued=5
    )
    modest = UserSettings(max_concurrent_conversations=2)
    assert user_limits(modest, OPERATOR).max_concurrent == 2
    assert user_limits(None, OPERATOR).max_concurrent == 3


def test_priority_and_budget_are_capped_by_the_operator() -> None:
    asked = ConversationSpec(priority=100, max_budget_per_task=1000)
    spec = effective_spec(asked, UserSettings(max_budget_per_task=500), OPERATOR)
    assert (spec.priority, spec.max_budget_per_task) == (0, 10.0)
    # Lowering one's own priority and a budget within the maximum are kept.
    spec = effective_spec(ConversationSpec(priority=-5, max_budget_per_task=2), None, OPERATOR)
    assert (spec.priority, spec.max_budget_per_task) == (-5, 2)
    # No budget asked for: the operator's maximum is the budget.
    assert effective_spec(ConversationSpec(), None, OPERATOR).max_budget_per_task == 10.0
