"""Shared helpers for session-manager tests."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from taskbus.contracts.events import Event
from taskbus.session_manager.state import ConversationState, fold

CID = "c1"

FoldEvents = Callable[..., ConversationState]


@pytest.fixture
def fold_events() -> FoldEvents:
    """Fold events given in log order, numbering them 0, 1, 2… as the appender would."""

    def state_of(*events: Event) -> ConversationState:
        return fold(CID, [msgspec.structs.replace(e, id=i) for i, e in enumerate(events)])

    return state_of
