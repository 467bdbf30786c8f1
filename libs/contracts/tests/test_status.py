"""The status transition table, checked exhaustively."""

from __future__ import annotations

import itertools

import pytest

from taskbus.contracts.status import (
    TRANSITIONS,
    ConversationStatus,
    InvalidTransition,
    can_transition,
    check_transition,
)

S = ConversationStatus

ALLOWED = {
    (S.QUEUED, S.STARTING), (S.QUEUED, S.STOPPED), (S.QUEUED, S.ERROR), (S.QUEUED, S.ARCHIVED),
    (S.STARTING, S.RUNNING), (S.STARTING, S.PAUSED), (S.STARTING, S.STOPPED),
    (S.STARTING, S.ERROR), (S.STARTING, S.ARCHIVED),
    (S.RUNNING, S.PAUSED), (S.RUNNING, S.STOPPED), (S.RUNNING, S.FINISHED),
    (S.RUNNING, S.ERROR), (S.RUNNING, S.ARCHIVED),
    (S.PAUSED, S.RUNNING), (S.PAUSED, S.STOPPED), (S.PAUSED, S.ERROR), (S.PAUSED, S.ARCHIVED),
    (S.STOPPED, S.QUEUED), (S.STOPPED, S.STARTING), (S.STOPPED, S.ARCHIVED),
    (S.FINISHED, S.QUEUED), (S.FINISHED, S.STARTING), (S.FINISHED, S.RUNNING),
    (S.FINISHED, S.ARCHIVED),  # never STOPPED: the record of success stays
    (S.ERROR, S.QUEUED), (S.ERROR, S.STARTING), (S.ERROR, S.RUNNING),
    (S.ERROR, S.STOPPED), (S.ERROR, S.ARCHIVED),
}  # fmt: skip


def test_table_covers_every_status() -> None:
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize("current,target", list(itertools.product(S, S)))
def test_each_pair_is_allowed_exactly_when_listed(
    current: ConversationStatus, target: ConversationStatus
) -> None:
    expected = (current, target) in ALLOWED
    assert can_transition(current, target) is expected
    if expected:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, target)


def test_archived_is_terminal_and_nothing_returns_to_itself() -> None:
    assert not TRANSITIONS[S.ARCHIVED]
    assert all(status not in TRANSITIONS[status] for status in S)
