"""Event contracts: golden payloads stay decodable forever, unknown kinds pass through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskbus.contracts.events import (
    EVENT_TYPES,
    CmdRunAction,
    EventSource,
    UnknownEvent,
    decode_event,
    encode_event,
)
from taskbus.contracts.wire import to_wire

GOLDEN = Path(__file__).parent / "golden"


def test_every_event_kind_has_a_golden_example() -> None:
    assert {path.stem for path in GOLDEN.glob("*.json")} == set(EVENT_TYPES)


def _as_old(new: Any, old: Any) -> Any:
    """`new` cut down to the keys `old` has, at every depth."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {key: _as_old(new[key], old[key]) for key in old if key in new}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [_as_old(n, o) for n, o in zip(new, old, strict=True)]
    return new


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_golden_payload_decodes_and_round_trips_without_loss(path: Path) -> None:
    golden = json.loads(path.read_text())
    event = decode_event(path.read_bytes())
    assert type(event).__name__ == path.stem
    reencoded = json.loads(encode_event(event))  # type: ignore[arg-type]
    # New fields may appear (with defaults, nested ones too); nothing of the old payload may
    # change or vanish.
    assert _as_old(reencoded, golden) == golden
    assert decode_event(encode_event(event)) == event  # type: ignore[arg-type]


def test_unknown_kind_is_kept_whole() -> None:
    raw = b'{"kind":"FutureThing","conversation_id":"c1","id":7,"extra":{"a":[1,2]}}'
    event = decode_event(raw)
    assert isinstance(event, UnknownEvent)
    assert (event.kind, event.conversation_id, event.id) == ("FutureThing", "c1", 7)
    assert bytes(event.payload) == raw
    assert to_wire(raw) == json.loads(raw)


def test_known_kind_with_wrong_field_type_is_a_validation_error() -> None:
    bad = b'{"kind":"CmdRunAction","conversation_id":"c1","source":"agent","command":42}'
    with pytest.raises(msgspec.ValidationError, match="command"):
        decode_event(bad)


def test_payload_without_envelope_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"command":"ls"}')


def test_wire_view_follows_openhands_shape() -> None:
    action = decode_event((GOLDEN / "CmdRunAction.json").read_bytes())
    view = to_wire(encode_event(action))  # type: ignore[arg-type]
    assert view["action"] == "run"
    assert view["args"]["command"] == "npm test"
    assert view["id"] == 8 and view["source"] == "agent" and view["kind"] == "CmdRunAction"

    observation = to_wire((GOLDEN / "CmdOutputObservation.json").read_bytes())
    assert observation["observation"] == "run"
    assert observation["content"] == "PASS src/app.test.ts\n"
    assert observation["extras"]["exit_code"] == 0
    assert observation["cause"] == 8

    status = to_wire((GOLDEN / "ConversationStatusChanged.json").read_bytes())
    assert status["status"] == "STARTING" and "action" not in status


def test_resource_usage_is_a_null_observation_with_its_figures_on_top() -> None:
    """OpenHands clients skip it (no class of theirs); Taskbus clients read its figures."""
    view = to_wire((GOLDEN / "ResourceUsage.json").read_bytes())
    assert (view["observation"], view["extras"], view["kind"]) == ("null", {}, "ResourceUsage")
    assert "action" not in view and view["content"] == view["message"] == "ResourceUsage"
    figures = ("cpu_seconds", "memory_bytes", "memory_peak_bytes", "pids", "disk_bytes")
    golden = json.loads((GOLDEN / "ResourceUsage.json").read_bytes())
    assert {name: view[name] for name in figures} == {name: golden[name] for name in figures}
    assert view["measured_by"] == golden["measured_by"]


def test_new_events_get_unassigned_id_and_utc_timestamp() -> None:
    event = CmdRunAction(conversation_id="c1", source=EventSource.AGENT, command="ls")
    assert event.id == -1
    assert event.timestamp.utcoffset() is not None
    assert event.timestamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
