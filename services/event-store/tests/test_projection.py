"""When the ingest folds an event (the fold itself is contracts.summary, tested there)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from taskbus.contracts.events import ConversationCreated, ConversationStatusChanged, EventSource
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.summary import summarize
from taskbus.event_store.projection import in_log_order, is_newer

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CID = "conv-1"
ENV = EventSource.ENVIRONMENT


def created() -> ConversationCreated:
    return ConversationCreated(
        conversation_id=CID,
        source=EventSource.USER,
        id=0,
        timestamp=T0,
        user_id="alice",
        title="Fix the tests",
        spec=ConversationSpec(),
    )


def test_is_newer_compares_positions_in_the_log() -> None:
    base = summarize(None, created())
    assert base is not None
    later = msgspec.structs.replace(base, last_event_id=3)
    assert is_newer(later, base)
    assert not is_newer(base, later)
    assert not is_newer(base, base)


def test_in_log_order_holds_back_events_after_a_gap() -> None:
    def status(event_id: int) -> ConversationStatusChanged:
        return ConversationStatusChanged(
            conversation_id=CID, source=ENV, id=event_id, status=ConversationStatus.RUNNING
        )

    info = summarize(summarize(summarize(None, created()), status(1)), status(2))
    assert info is not None
    assert in_log_order(info, status(3))  # the next one
    assert in_log_order(info, status(1))  # a redelivery: apply ignores it
    assert not in_log_order(info, status(4))  # 3 has not been seen yet
    assert in_log_order(None, created())
    assert not in_log_order(None, status(5))  # the conversation's beginning has not been seen
