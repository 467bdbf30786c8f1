"""Pure parts of the gateway: keys, ids, the conversation view, client input, log redaction,
the settings view, the routes kept off the thread pool."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute

from taskbus.contracts.commands import ConfirmAction, SendMessage, StopConversation
from taskbus.contracts.observability import RedactApiKeys
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.specs import MAX_MESSAGE_CHARS, UserSettings
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.gateway.app import create_app
from taskbus.gateway.auth import ApiKeyError, ApiKeys
from taskbus.gateway.conversations import (
    ConversationView,
    command_msg_id,
    conversation_id_for,
)
from taskbus.gateway.inputs import (
    command_for_action,
    decode_client_action,
    repository_problem,
)
from taskbus.gateway.limits import ConnectionLimiter, RateLimiter
from taskbus.gateway.settings import GatewaySettings
from taskbus.gateway.user_settings import OPENHANDS_ONLY_SETTINGS, SettingsView, reflects


def test_api_keys_from_string_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# local keys\nk3 = carol\n\n")
    keys = ApiKeys.from_settings("k1=alice, k2=bob", str(keys_file))
    assert len(keys) == 3
    assert [keys.user_for_key(k) for k in ("k1", "k2", "k3", "k4")] == [
        "alice",
        "bob",
        "carol",
        None,
    ]
    assert keys.user_for_authorization("Bearer k2") == "bob"
    assert keys.user_for_authorization("bearer   k2 ") == "bob"
    for header in (None, "", "k2", "Basic k2", "Bearer k2 extra", "Bearer"):
        assert keys.user_for_authorization(header) is None


def test_malformed_key_entries_are_rejected_without_echoing_the_key() -> None:
    with pytest.raises(ApiKeyError) as error:
        ApiKeys.parse(["good=alice", "sekrit-without-user"])
    assert "entry 2" in str(error.value) and "sekrit" not in str(error.value)


def test_conversation_ids_are_fresh_or_derived_per_user_and_key() -> None:
    assert conversation_id_for("alice", None) != conversation_id_for("alice", None)
    derived = conversation_id_for("alice", "k")
    assert derived == conversation_id_for("alice", "k")
    assert len(derived) == 32 and derived.isalnum()
    assert derived != conversation_id_for("bob", "k") != conversation_id_for("alice", "k2")
    # The user/key boundary is unambiguous.
    assert conversation_id_for("a", "b:c") != conversation_id_for("a:b", "c")
    assert command_msg_id("Stop", "c1", "alice", "k") == command_msg_id("Stop", "c1", "alice", "k")
    assert command_msg_id("Stop", "c1", "alice", "k") != command_msg_id("Pause", "c1", "alice", "k")
    assert command_msg_id("Stop", "c1", "alice", None) != command_msg_id(
        "Stop", "c1", "alice", None
    )


def test_the_view_names_fields_as_openhands_and_hides_the_user() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    info = ConversationInfo(
        conversation_id="c1",
        user_id="alice",
        title="Fix it",
        status=ConversationStatus.PAUSED,
        agent_state=AgentState.PAUSED,
        status_reason="idle",
        repository="https://x/r.git",
        selected_branch="main",
        priority=5,
        created_at=start,
        updated_at=start + timedelta(seconds=9),
        accumulated_cost=1.5,
        event_count=8,
        last_event_id=7,
    )
    view = msgspec.to_builtins(ConversationView.of(info))
    assert view["selected_repository"] == "https://x/r.git"
    assert view["last_updated_at"] == "2025-01-01T00:00:09Z"
    assert (view["taskbus_status"], view["status_reason"], view["agent_state"]) == (
        "PAUSED",
        "idle",
        "paused",
    )
    # OpenHands' words: a paused agent in a live loop is a RUNNING conversation.
    assert (view["status"], view["runtime_status"]) == ("RUNNING", "STATUS$READY")
    assert view["url"] == f"/api/conversations/{info.conversation_id}"
    assert view["session_api_key"] is None
    assert (view["event_count"], view["last_event_id"], view["accumulated_cost"]) == (8, 7, 1.5)
    assert "user_id" not in view


def test_client_actions_map_to_validated_commands() -> None:
    message = command_for_action(
        decode_client_action('{"action": "message", "message": "hi"}'), "alice", "c1"
    )
    assert message == SendMessage(user_id="alice", conversation_id="c1", content="hi")
    reject = command_for_action(decode_client_action('{"action": "reject"}'), "alice", "c1")
    assert reject == ConfirmAction(user_id="alice", conversation_id="c1", confirmed=False)
    stop = command_for_action(decode_client_action(b'{"action": "stop"}'), "alice", "c1")
    assert isinstance(stop, StopConversation)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "{}",
        '{"action": "fly"}',
        '{"action": "pause", "extra": 1}',
        '{"action": "message"}',
        '{"action": "message", "message": 5}',
    ],
)
def test_invalid_client_actions_fail_to_decode(text: str) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_client_action(text)


@pytest.mark.parametrize("message", ["", "x" * (MAX_MESSAGE_CHARS + 1)])
def test_messages_outside_the_contracts_bounds_are_invalid(message: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_client_action(msgspec.json.encode({"action": "message", "message": message}))


def test_deeply_nested_client_actions_are_invalid_not_a_crash() -> None:
    with pytest.raises(msgspec.ValidationError, match="nested too deeply"):
        # msgspec must read past the nesting to find the tag
        decode_client_action('{"x": ' + "[" * 100_000 + "]" * 100_000 + ', "action": "pause"}')


def test_api_keys_in_websocket_urls_are_redacted_from_logs() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/api/conversations/c/events?after_id=3&api_key=top-secret"),
        None,
    )
    assert RedactApiKeys().filter(record)
    message = record.getMessage()
    assert "top-secret" not in message
    assert message.endswith('/events?after_id=3&api_key=***" [accepted]')


def test_settings_view_tells_only_whether_a_key_is_stored() -> None:
    assert SettingsView.of(None) == SettingsView()
    view = SettingsView.of(UserSettings(llm_model="m", llm_api_key="sk-1", max_iterations=7))
    assert view == SettingsView(llm_model="m", llm_api_key_set=True, max_iterations=7)
    assert "sk-1" not in msgspec.json.encode(view).decode()
    assert SettingsView.of(UserSettings(llm_api_key="")).llm_api_key_set is False
    view_fields = set(SettingsView.__struct_fields__) - OPENHANDS_ONLY_SETTINGS
    assert view_fields == set(UserSettings.__struct_fields__)
    assert SettingsView().llm_api_key is None  # OpenHands' key, never the key itself


@pytest.mark.parametrize(
    ("stored", "requested", "expected"),
    [
        (UserSettings(llm_model="m"), UserSettings(llm_model="m"), True),
        (UserSettings(llm_model="m", llm_api_key="k"), UserSettings(llm_model="m"), True),
        (UserSettings(llm_api_key="k"), UserSettings(llm_api_key="k2"), False),
        (UserSettings(llm_api_key="k"), UserSettings(llm_api_key=""), False),
        (UserSettings(llm_model="m", max_iterations=3), UserSettings(llm_model="m"), False),
    ],
)
def test_stored_settings_reflect_a_put(
    stored: UserSettings, requested: UserSettings, expected: bool
) -> None:
    assert reflects(stored, requested) is expected


@pytest.mark.parametrize(
    ("repository", "refused"),
    [
        (None, False),
        ("https://github.com/acme/web.git", False),
        ("ssh://git@github.com/acme/web.git", False),
        ("git@github.com:acme/web.git", False),
        ("/srv/repos/web", False),
        ("https://ghp_token@github.com/acme/web.git", True),
        ("HTTPS://user:pw@github.com/acme/web.git", True),
        ("ssh://git:pw@example.org/web.git", True),
    ],
)
def test_repository_urls_with_credentials_are_refused(
    repository: str | None, refused: bool
) -> None:
    problem = repository_problem(repository)
    assert (problem is not None) is refused
    assert problem is None or problem.status == 422


def test_the_creation_rate_allows_a_burst_then_one_per_interval() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_minute=6, burst=3, clock=lambda: now[0])
    assert [limiter.take("mallory") for _ in range(3)] == [None, None, None]
    assert limiter.take("mallory") == pytest.approx(10.0)  # one token per 10 s
    assert limiter.take("alice") is None  # another user's bucket is untouched
    now[0] = 9.0
    assert limiter.take("mallory") == pytest.approx(1.0)
    now[0] = 10.0
    assert limiter.take("mallory") is None
    now[0] = 1000.0  # a long pause refills only up to the burst
    assert [limiter.take("mallory") is None for _ in range(4)] == [True, True, True, False]


def test_connections_are_counted_per_user_and_released() -> None:
    limiter = ConnectionLimiter(2)
    assert [limiter.acquire("u"), limiter.acquire("u"), limiter.acquire("u")] == [
        True,
        True,
        False,
    ]
    assert limiter.acquire("v")
    limiter.release("u")
    assert limiter.acquire("u")


def _route_calls(routes: Iterable[BaseRoute]) -> Iterator[tuple[str, Callable[..., object]]]:
    """(path, callable) of every endpoint and dependency of the routes, included routers too."""
    for route in routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            dependants = [route.dependant]
            while dependants:
                dependant = dependants.pop()
                if dependant.call is not None:
                    yield route.path, dependant.call
                dependants += dependant.dependencies
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            yield from _route_calls(included.routes)


def test_no_route_runs_its_handler_or_a_dependency_in_the_thread_pool() -> None:
    """FastAPI runs a plain `def` in its thread pool: two thread switches per call on every
    request (POST /message made three such calls), each a wait for the CPU on a busy machine."""
    app = create_app(GatewaySettings(api_keys="key=user"))
    calls = list(_route_calls(app.routes))
    assert "/api/conversations/{conversation_id}/message" in {path for path, _ in calls}
    in_threads = {
        f"{path}: {getattr(call, '__name__', type(call).__name__)}"
        for path, call in calls
        if not (
            inspect.iscoroutinefunction(call)
            # an instance, e.g. HTTPBearer: its __call__ says (callable() would not)
            or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004
        )
    }
    assert not in_threads, sorted(in_threads)
