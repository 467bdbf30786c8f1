"""The AsyncAPI description matches the contracts: every message, subject and payload."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.asyncapi import asyncapi_document
from taskbus.contracts.commands import (
    AnyCommand,
    SendMessage,
    UpdateSettings,
    command_subject,
    encode_command,
)
from taskbus.contracts.events import EVENT_TYPES
from taskbus.contracts.partitions import partition_of
from taskbus.contracts.queries import Query, Reply, SearchEvents
from taskbus.contracts.specs import UserSettings

GOLDEN = Path(__file__).parent / "golden"
DOCUMENT = asyncapi_document()


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def resolve(ref: str) -> Any:
    node: Any = DOCUMENT
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_and_the_document_is_json() -> None:
    assert json.loads(json.dumps(DOCUMENT)) == DOCUMENT
    for ref in refs(DOCUMENT):
        assert resolve(ref) is not None, ref


def test_each_channel_carries_every_message_of_its_kind() -> None:
    channels = DOCUMENT["channels"]
    expected = {
        "events": set(EVENT_TYPES),
        "commands": {t.__name__ for t in typing.get_args(AnyCommand)},
        "queries": {t.__name__ for t in Query.__subclasses__()},
        "replies": {t.__name__ for t in Reply.__subclasses__()},
    }
    assert {name: set(channel["messages"]) for name, channel in channels.items()} == expected


def test_addresses_are_the_subjects_the_services_use() -> None:
    channels = DOCUMENT["channels"]
    assert channels["events"]["address"].format(
        partition=partition_of("c1"), conversationId="c1", kind="CmdRunAction"
    ) == subjects.event_subject("c1", "CmdRunAction")
    send = SendMessage(user_id="u", conversation_id="c1", content="hi")
    assert channels["commands"]["address"].format(
        partition=partition_of("c1"), command="SendMessage"
    ) == command_subject(send)
    settings = UpdateSettings(user_id="u", settings=UserSettings())
    assert channels["commands"]["address"].format(
        partition=subjects.USER_COMMANDS_TOKEN, command="UpdateSettings"
    ) == command_subject(settings)
    assert channels["queries"]["address"].format(
        query=SearchEvents.subject_name
    ) == subjects.query_subject(SearchEvents.subject_name)


def validate(payload: Any, message: str) -> None:
    schema = {"$ref": f"#/components/schemas/{message}", "components": DOCUMENT["components"]}
    jsonschema.validate(payload, schema)


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_every_golden_event_matches_its_published_schema(path: Path) -> None:
    validate(json.loads(path.read_text()), path.stem)


def test_commands_and_queries_match_their_schemas_and_bad_ones_do_not() -> None:
    command = SendMessage(user_id="u", conversation_id="c1", content="hi")
    validate(json.loads(encode_command(command)), "SendMessage")
    validate({"user_id": "u", "conversation_id": "c1", "limit": 100}, "SearchEvents")
    with pytest.raises(jsonschema.ValidationError):
        validate({"user_id": "u", "conversation_id": "c1", "limit": 101}, "SearchEvents")
    with pytest.raises(jsonschema.ValidationError):
        validate({"command": "SendMessage", "user_id": "u", "conversation_id": "c1"}, "SendMessage")
