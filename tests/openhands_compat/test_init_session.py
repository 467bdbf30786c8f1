"""OpenHands' InitSessionRequest (openhands/server/routes/manage_conversations.py at 0.56.0):
what the gateway makes of each field, and images carried from the create to the LLM request."""

from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts.events import ConversationCreated, EventSource, MessageAction
from taskbus.contracts.openhands import ConversationTrigger, conversation_trigger
from taskbus.contracts.specs import (
    ConversationSpec,
    CreateMicroagent,
    GitProvider,
    SuggestedTask,
)
from taskbus.gateway.inputs import init_session
from taskbus.gateway.problems import Problem
from taskbus.session_manager.decide import start_events
from taskbus.session_manager.history import to_messages
from taskbus.session_manager.state import fold

PNG = "data:image/png;base64,iVBORw0KGgo="
TASK = SuggestedTask(
    git_provider=GitProvider.GITHUB,
    task_type="FAILING_CHECKS",
    repo="acme/app",
    issue_number=7,
    title="CI",
)


async def test_images_reach_the_llm_as_image_parts() -> None:
    spec = await init_session(ConversationSpec(initial_user_msg="What is this?", image_urls=[PNG]))
    created = ConversationCreated(
        id=0, conversation_id="c1", source=EventSource.USER, user_id="u", spec=spec, title="t"
    )
    state = fold("c1", [created])
    (message,) = [e for e in start_events(state) if isinstance(e, MessageAction)]
    assert message.image_urls == [PNG]
    numbered = [msgspec.structs.replace(e, id=i) for i, e in enumerate([created, message])]
    prompt = to_messages(fold("c1", numbered))
    assert prompt[-1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": PNG}},
        ],
    }


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("http://example.com/a.png", "schema"),  # not https: refused by the contract
        ("file:///etc/passwd", "schema"),
        ("https://127.0.0.1/a.png", 422),  # the LLM client would fetch from here
        ("https://169.254.169.254/latest/meta-data", 422),
        ("https://[::ffff:10.0.0.1]/a.png", 422),
        ("https://localhost/a.png", 422),
        ("https://no-such-host.invalid/a.png", 422),
    ],
)
async def test_image_urls_the_llm_client_must_not_fetch_are_refused(
    url: str, status: int | str
) -> None:
    body = msgspec.json.encode({"initial_user_msg": "x", "image_urls": [url]})
    if status == "schema":
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(body, type=ConversationSpec)
        return
    with pytest.raises(Problem) as refused:
        await init_session(msgspec.json.decode(body, type=ConversationSpec))
    assert refused.value.status == status and "image host" in refused.value.detail


async def test_replay_json_is_refused_saying_why() -> None:
    with pytest.raises(Problem) as refused:
        await init_session(ConversationSpec(initial_user_msg="x", replay_json="[]"))
    assert refused.value.status == 422 and "replay_json is not supported" in refused.value.detail


async def test_an_empty_create_is_refused_as_openhands_does() -> None:
    with pytest.raises(Problem) as refused:
        await init_session(msgspec.json.decode(b"{}", type=ConversationSpec))
    assert refused.value.status == 400
    assert refused.value.extensions["msg_id"] == "CONFIGURATION$MISSING_USER_MESSAGE"
    named = await init_session(ConversationSpec(title="waits for its first message"))
    assert named.initial_user_msg is None


async def test_a_suggested_task_writes_the_first_message_and_names_the_repository() -> None:
    spec = await init_session(ConversationSpec(suggested_task=TASK))
    assert spec.initial_user_msg and "#7" in spec.initial_user_msg
    assert "failing checks" in spec.initial_user_msg
    assert (spec.repository, spec.git_provider) == ("acme/app", "github")
    assert conversation_trigger(spec) == ConversationTrigger.SUGGESTED_TASK


async def test_create_microagent_names_the_repository_and_the_trigger() -> None:
    asked = CreateMicroagent(repo="acme/app", git_provider=GitProvider.GITLAB, title="lint")
    spec = await init_session(
        ConversationSpec(initial_user_msg="Write it", create_microagent=asked)
    )
    assert (spec.repository, spec.git_provider) == ("acme/app", "gitlab")
    assert conversation_trigger(spec) == ConversationTrigger.MICROAGENT_MANAGEMENT
    plain = await init_session(ConversationSpec(initial_user_msg="hi"))
    assert conversation_trigger(plain) == ConversationTrigger.REMOTE_API_KEY
