"""A runner's work, attacked: work forged for another runner, on a subject naming another
conversation, without its log sequence, or naming a runner id that is no subject token, is
refused before anything acts on it."""

from __future__ import annotations

import msgspec
import pytest
from nats.aio.msg import Msg

from taskbus.contracts import subjects
from taskbus.contracts.events import CmdRunAction, EventSource, encode_event
from taskbus.contracts.inbound import Refused
from taskbus.contracts.runner_work import EVENT_SEQUENCE_HEADER, inbound_work
from taskbus.contracts.runners import decode_runner_info

CID = "c0ffee"


def work(runner_id: str, conversation_id: str, sequence: str | None = "7") -> Msg:
    event = CmdRunAction(conversation_id=CID, source=EventSource.AGENT, id=3, command="ls")
    subject = subjects.runner_work_subject(
        runner_id, subjects.event_subject(conversation_id, event.kind)
    )
    headers = {EVENT_SEQUENCE_HEADER: sequence} if sequence is not None else None
    return Msg(_client=None, subject=subject, data=encode_event(event), headers=headers)  # type: ignore[arg-type]


def test_work_on_its_own_subject_is_taken_with_its_log_sequence() -> None:
    event, sequence = inbound_work("r1", work("r1", CID))
    assert (event.conversation_id, event.id, sequence) == (CID, 3, 7)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (work("r2", CID), "not this runner's work subject"),
        (work("r1", "someone-else"), "differs from the subject"),
        (work("r1", CID, sequence=None), "without its event's log sequence"),
        (work("r1", CID, sequence="-1"), "without its event's log sequence"),
    ],
)
def test_forged_work_is_refused(message: Msg, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        inbound_work("r1", message)


@pytest.mark.parametrize("runner_id", ["a.>", "a.*", "../x", "", "x" * 65])
def test_a_runner_id_that_is_no_subject_token_is_refused_at_decode(runner_id: str) -> None:
    """A forged heartbeat naming such a runner cannot steer placement to a wildcard subject."""
    forged = msgspec.json.encode(
        {
            "runner_id": runner_id,
            "host": "h",
            "backend": "local",
            "isolation": "none",
            "started_at": "2026-12-01T00:00:00Z",
        }
    )
    with pytest.raises(msgspec.ValidationError):
        decode_runner_info(forged)
