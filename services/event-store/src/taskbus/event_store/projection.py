"""When the ingest may fold an event into the status projection.

The fold itself is `contracts.summary.summarize`, shared with the gateway. It is idempotent per
event (an event whose id is not past `last_event_id` changes nothing), and ids are dense and
folded in order per conversation, which is what makes that check sufficient.
"""

from __future__ import annotations

from taskbus.contracts.events import AnyEvent, ConversationCreated, UnknownEvent
from taskbus.contracts.queries import ConversationInfo


def in_log_order(info: ConversationInfo | None, event: AnyEvent | UnknownEvent) -> bool:
    """Whether folding `event` now keeps the conversation's order.

    True for the next event, one already folded (a redelivery) and a conversation's beginning.
    False after a gap: JetStream redelivers an unacked event only after its ack wait, so after a
    crash newer events can arrive before older ones, and folding them first would skip the older
    ones for good.
    """
    if info is None:
        return isinstance(event, ConversationCreated) or event.id <= 0
    return event.id <= info.last_event_id + 1


def is_newer(candidate: ConversationInfo, current: ConversationInfo) -> bool:
    """Whether `candidate` may replace `current` without moving the conversation backwards."""
    return candidate.last_event_id > current.last_event_id
