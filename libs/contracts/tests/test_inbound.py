"""What a consumer refuses before acting: the checks of `inbound`, one per way to lie."""

from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.commands import (
    DeleteConversation,
    UpdateSettings,
    command_subject,
    encode_command,
)
from taskbus.contracts.events import (
    ConversationDeleted,
    EventSource,
    ThinkAction,
    UnknownEvent,
    encode_event,
)
from taskbus.contracts.inbound import Refused, inbound_command, inbound_event
from taskbus.contracts.partitions import PARTITIONS, partition_of
from taskbus.contracts.specs import UserSettings

CID = "c0ffee_conversation-1"


def deleted(conversation_id: str) -> bytes:
    return encode_event(
        ConversationDeleted(conversation_id=conversation_id, source=EventSource.USER, id=3)
    )


def test_an_event_on_its_own_subject_is_accepted() -> None:
    event = inbound_event(subjects.event_subject(CID, "ConversationDeleted"), deleted(CID))
    assert isinstance(event, ConversationDeleted)
    assert event.conversation_id == CID


def test_an_unknown_kind_passes_through_when_its_envelope_is_sound() -> None:
    data = msgspec.json.encode({"kind": "FromTheFuture", "conversation_id": CID, "id": 1})
    event = inbound_event(subjects.event_subject(CID, "FromTheFuture"), data)
    assert isinstance(event, UnknownEvent)


@pytest.mark.parametrize(
    ("subject", "payload_id", "why"),
    [
        # The runner once rmtree'd `<workspaces>/../../x` for this one.
        (subjects.event_subject(CID, "ConversationDeleted"), "../../x", "invalid conversation id"),
        (subjects.event_subject(CID, "ConversationDeleted"), "other", "differs from the subject"),
        (subjects.event_subject(CID, "ConversationDeleted"), CID + "\n", "invalid"),
        (subjects.event_subject("a" * 65, "ConversationDeleted"), "a" * 65, "invalid"),
        (subjects.event_subject("%2e%2e", "ConversationDeleted"), "%2e%2e", "invalid"),
        (f"{subjects.EVENTS_PREFIX}.0.{CID}.x.ConversationDeleted", CID, "not an event subject"),
        (subjects.conversation_command_subject(CID, "y") + ".z", CID, "not an event subject"),
    ],
)
def test_forged_ids_are_refused(subject: str, payload_id: str, why: str) -> None:
    with pytest.raises(Refused, match=why):
        inbound_event(subject, deleted(payload_id))


def test_a_kind_other_than_the_subjects_is_refused() -> None:
    """Consumers filter by kind on the subject (the runner takes only its kinds)."""
    think = encode_event(ThinkAction(conversation_id=CID, source=EventSource.AGENT, thought="t"))
    with pytest.raises(Refused, match="kind differs"):
        inbound_event(subjects.event_subject(CID, "ConversationDeleted"), think)


def test_undecodable_events_are_refused() -> None:
    with pytest.raises(Refused, match="undecodable"):
        inbound_event(subjects.event_subject(CID, "X"), b"{not json")


def test_commands_with_a_path_like_id_are_refused() -> None:
    bad = DeleteConversation(user_id="u", conversation_id="../../x")
    with pytest.raises(Refused, match="invalid conversation id"):
        inbound_command(subjects.user_command_subject(bad.name()), encode_command(bad))
    good = DeleteConversation(user_id="u", conversation_id=CID)
    assert isinstance(
        inbound_command(command_subject(good), encode_command(good)), DeleteConversation
    )
    # A command about no conversation has no id to check.
    settings = UpdateSettings(user_id="u", settings=UserSettings())
    assert isinstance(
        inbound_command(command_subject(settings), encode_command(settings)), UpdateSettings
    )
    with pytest.raises(Refused, match="invalid command"):
        inbound_command(
            subjects.user_command_subject("Nope"), b'{"command": "Nope", "user_id": "u"}'
        )


def test_a_command_on_another_partition_or_kind_subject_is_refused() -> None:
    """Only the owner of a conversation's partition may apply its commands: one sent (forged)
    to another partition, or as another command, is never acted on."""
    delete = DeleteConversation(user_id="u", conversation_id=CID)
    other = next(p for p in range(PARTITIONS) if p != partition_of(CID))
    forged = f"{subjects.COMMANDS_PREFIX}.{subjects.SESSION_MANAGER}.{other}.DeleteConversation"
    for subject in (
        forged,
        subjects.conversation_command_subject(CID, "SendMessage"),
        subjects.user_command_subject("DeleteConversation"),
    ):
        with pytest.raises(Refused, match="not this command's subject"):
            inbound_command(subject, encode_command(delete))


def test_an_event_on_another_partition_is_refused() -> None:
    think = encode_event(ThinkAction(conversation_id=CID, source=EventSource.AGENT, thought="t"))
    other = next(p for p in range(PARTITIONS) if p != partition_of(CID))
    with pytest.raises(Refused, match="partition"):
        inbound_event(f"{subjects.EVENTS_PREFIX}.{other}.{CID}.ThinkAction", think)
    assert inbound_event(subjects.event_subject(CID, "ThinkAction"), think).conversation_id == CID
