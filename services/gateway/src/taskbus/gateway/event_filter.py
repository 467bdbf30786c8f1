"""OpenHands' EventFilter (openhands/events/event_filter.py at 0.56.0) as search_events reads
it: the GET's JSON body, where OpenHands reads it, or a `filter` query parameter holding the
same JSON; it becomes the contract query's criteria."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import Query

from taskbus.contracts.events import EVENT_TYPES, EventSource
from taskbus.contracts.specs import MAX_NAME_CHARS, MAX_QUERY_TEXT_CHARS
from taskbus.gateway.inputs import decode_json
from taskbus.gateway.problems import Problem

TypeName = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
TypeNames = Annotated[list[TypeName], msgspec.Meta(max_length=100)]
DateText = Annotated[str, msgspec.Meta(max_length=64)]
MAX_FILTER_CHARS = 16 * 1024


class EventFilter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which events search_events returns. Types are OpenHands class names
    (`AgentStateChangedObservation`, `NullObservation`) or Taskbus kinds (`ThinkAction`);
    `exclude_hidden` is accepted and changes nothing, as no Taskbus event is hidden."""

    exclude_hidden: bool = False
    query: Annotated[str, msgspec.Meta(max_length=MAX_QUERY_TEXT_CHARS)] | None = None
    include_types: TypeNames | None = None
    exclude_types: TypeNames | None = None
    source: EventSource | None = None
    start_date: DateText | None = None
    end_date: DateText | None = None


# OpenHands class names whose Taskbus kind has another name; NullObservation is every kind
# served as OpenHands' `null` observation (see contracts/wire.py).
_OPENHANDS_CLASS_KINDS: dict[str, list[str]] = {
    "AgentThinkAction": ["ThinkAction"],
    "AgentStateChangedObservation": ["AgentStateChanged"],
    "NullObservation": sorted(
        kind
        for kind, event_type in EVENT_TYPES.items()
        if not (event_type.openhands_action or event_type.openhands_observation)
    ),
}


class UnknownEventType(ValueError):
    pass


_filter_decoder = msgspec.json.Decoder(EventFilter)


def kinds_of(names: list[str] | None) -> list[str]:
    """Taskbus kinds for OpenHands class names or kinds; UnknownEventType for anything else."""
    kinds: list[str] = []
    for name in names or []:
        if name in EVENT_TYPES:
            kinds.append(name)
        elif name in _OPENHANDS_CLASS_KINDS:
            kinds.extend(_OPENHANDS_CLASS_KINDS[name])
        else:
            raise UnknownEventType(f"unknown event type {name!r}")
    return kinds


def search_criteria(event_filter: EventFilter) -> dict[str, Any]:
    """SearchEvents fields for the filter's criteria (only those it sets)."""
    fields: dict[str, Any] = {
        "query": event_filter.query,
        "source": event_filter.source,
        "since": event_filter.start_date,
        "until": event_filter.end_date,
    }
    fields = {key: value for key, value in fields.items() if value is not None}
    if event_filter.include_types:
        fields["kinds"] = kinds_of(event_filter.include_types)
    if event_filter.exclude_types:
        fields["exclude_kinds"] = kinds_of(event_filter.exclude_types)
    return fields


FilterParameter = Annotated[
    str | None,
    Query(
        description="OpenHands' EventFilter as JSON, e.g. "
        '`{"query": "npm", "exclude_types": ["NullObservation"]}`; it may also be the body',
        max_length=MAX_FILTER_CHARS,
    ),
]


def _invalid(detail: str) -> Problem:
    return Problem(422, detail, kind="validation-error", title="Invalid filter")


def with_event_filter(flat: dict[str, Any], parameter: str | None, body: bytes) -> dict[str, Any]:
    """The search criteria of the flat parameters and of the EventFilter, from the `filter`
    parameter or the body (not both). A criterion given both ways is a 422."""
    if parameter is not None and body.strip():
        raise _invalid("give the filter either as the body or as the filter parameter")
    text = parameter if parameter is not None else body
    if not text or not text.strip():
        return flat
    try:
        criteria = search_criteria(decode_json(text, _filter_decoder))
    except (msgspec.DecodeError, UnknownEventType) as error:
        raise _invalid(f"filter: {error}") from error
    both = [key for key, value in criteria.items() if flat.get(key) not in (None, [])]
    if both:
        raise _invalid(f"{', '.join(both)} given both in the filter and as parameters")
    return flat | criteria
