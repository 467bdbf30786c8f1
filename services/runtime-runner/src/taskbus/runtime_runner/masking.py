"""Secret values never reach the log from the runner: every event it appends for a conversation
has each value opened for that conversation (its sandbox secrets, its git token) replaced by
OpenHands' mask `<secret_hidden>`, in every string field (observations, output chunks, errors,
MCP observations, whatever is added later).

Output chunks: a value split across two chunks of one command is masked too. Each chunk holds
back its longest tail that is the beginning of a value and sends it at the head of the next
chunk; the command's observation, which carries its whole output, is masked whole, so a tail
held back when the command ends is in the observation, masked, and never lost. What is not
guaranteed: a fragment of a value cut by the output cap (an observation keeps the head and the
tail of a very long output) is not recognised as the value it came from.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import CmdOutputChunk, Event

MASK = "<secret_hidden>"
# Fields that identify rather than carry content: never rewritten.
_IDENTITY_FIELDS = frozenset({"conversation_id"})

E = TypeVar("E", bound=Event)


class SecretMasks:
    """The values to mask, per conversation: every value ever opened for it in this process
    (a value replaced meanwhile stays masked; an event can still echo the old one)."""

    def __init__(self) -> None:
        self._values: dict[str, frozenset[str]] = {}

    def add(self, conversation_id: str, values: Iterable[str]) -> None:
        new = frozenset(value for value in values if value)
        if new:
            self._values[conversation_id] = self._values.get(conversation_id, frozenset()) | new

    def of(self, conversation_id: str) -> list[str]:
        """Longest first, so a value containing another is masked whole."""
        return sorted(self._values.get(conversation_id, ()), key=len, reverse=True)


def mask_text(text: str, values: Sequence[str]) -> str:
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def masked(item: Any, values: Sequence[str]) -> Any:
    """`item` with every string in it masked; the same object when nothing changes."""
    if isinstance(item, enum.Enum):
        return item
    if isinstance(item, str):
        result = mask_text(item, values)
        return item if result == item else result
    if isinstance(item, msgspec.Struct):
        changes = {}
        for name in item.__struct_fields__:
            if name in _IDENTITY_FIELDS:
                continue
            current = getattr(item, name)
            new = masked(current, values)
            if new is not current:
                changes[name] = new
        return msgspec.structs.replace(item, **changes) if changes else item
    if isinstance(item, list | tuple):
        items = [masked(element, values) for element in item]
        if all(new is old for new, old in zip(items, item, strict=True)):
            return item
        return type(item)(items)
    if isinstance(item, dict):
        pairs = {masked(key, values): masked(value, values) for key, value in item.items()}
        return item if pairs == item else pairs
    return item


def _unfinished_tail(text: str, values: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some value (without being all of it)."""
    longest = min(max((len(value) for value in values), default=1) - 1, len(text))
    for length in range(longest, 0, -1):
        tail = text[-length:]
        if any(value.startswith(tail) for value in values):
            return length
    return 0


class MaskingAppender(EventAppender):
    """The runner's appender, masking each conversation's secret values (see the module)."""

    def __init__(self, js: JetStreamContext, masks: SecretMasks) -> None:
        super().__init__(js)
        self._masks = masks
        # (conversation id, cause) -> output held back from a command's last chunk
        self._held: dict[tuple[str, int | None], str] = {}

    async def append_all(self, events: Sequence[E]) -> list[E]:
        if not events:
            return []
        values = self._masks.of(events[0].conversation_id)
        if not values:
            return await super().append_all(events)
        return await super().append_all([self._mask(event, values) for event in events])

    def _mask(self, event: E, values: Sequence[str]) -> E:
        key = (event.conversation_id, event.cause)
        if not isinstance(event, CmdOutputChunk):
            self._held.pop(key, None)  # the observation: it has the whole output
            masked_event: E = masked(event, values)
            return masked_event
        text = mask_text(self._held.pop(key, "") + event.content, values)
        held = _unfinished_tail(text, values)
        if held:
            self._held[key] = text[-held:]
            text = text[:-held]
        chunk: E = msgspec.structs.replace(event, content=text)
        return chunk
