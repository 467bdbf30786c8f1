"""Every event kind, from its golden payload (libs/contracts/tests/golden/), served through the
wire view, parses with OpenHands' event_from_dict (ported in event_from_dict.py); and the port
itself refuses what OpenHands refuses, so the check can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskbus.contracts.events import EVENT_TYPES
from taskbus.contracts.wire import to_wire

from .event_from_dict import OpenHandsParseError, event_from_dict

GOLDEN = Path(__file__).parents[2] / "libs/contracts/tests/golden"


def test_every_event_kind_has_a_golden_payload() -> None:
    assert {path.stem for path in GOLDEN.glob("*.json")} == set(EVENT_TYPES)


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_openhands_parses_every_served_event(kind: str) -> None:
    view = to_wire((GOLDEN / f"{kind}.json").read_bytes())
    parsed = event_from_dict(view)
    event_type = EVENT_TYPES[kind]
    if event_type.openhands_action:
        assert parsed == f"action:{event_type.openhands_action}"
    elif event_type.openhands_observation:
        assert parsed == f"observation:{event_type.openhands_observation}"
    else:
        assert parsed == "observation:null" and view["content"]
    assert view["kind"] == kind  # Taskbus clients still read the kind


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_no_field_of_the_event_is_lost(kind: str) -> None:
    """Each Taskbus field is served under its own name or OpenHands' (args/extras/content)."""
    raw = (GOLDEN / f"{kind}.json").read_bytes()
    stored: dict[str, Any] = msgspec.json.decode(raw)
    view = to_wire(raw)
    served = {**view, **view.get("args", {}), **view.get("extras", {})}
    renamed = {"forgotten_start_id", "forgotten_end_id", "code", "action"}
    for key, value in stored.items():
        if key in renamed and key not in served:
            continue
        name = f"taskbus_{key}" if key == "action" else key
        assert served.get(name, served.get(key)) == value, (kind, key)


@pytest.mark.parametrize(
    "event",
    [
        {"id": 1, "kind": "ConversationStatusChanged", "status": "RUNNING"},  # neither key
        {"action": "run", "args": {"command": "ls", "tool_call_id": "x"}},  # unknown argument
        {"action": "write", "args": {"path": "a"}},  # a required argument missing
        {"action": "pause", "args": {}},  # no class of that name
        {"observation": "error", "content": "x", "extras": {"code": "llm_auth"}},
        {"observation": "null", "content": "x", "source": "system"},
    ],
)
def test_the_port_refuses_what_openhands_refuses(event: dict[str, Any]) -> None:
    with pytest.raises(OpenHandsParseError):
        event_from_dict(event)
