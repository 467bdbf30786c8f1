"""Size limits and per-user fairness limits, attacked through the public API of a real stack.

Issue 8 found: a 900 KB field made its owner's conversation list answer 503 forever (the reply
exceeded NATS' max_payload), deeply nested JSON answered 500, and 150 creates in 6 s were all
accepted. Each attack here must get a clear 4xx problem, and the victim's list must still answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from taskbus.contracts.commands import CreateConversation, SendMessage, encode_command
from taskbus.contracts.specs import (
    MAX_BRANCH_CHARS,
    MAX_INSTRUCTIONS_CHARS,
    MAX_MCP_CONFIG_BYTES,
    MAX_MCP_SERVERS,
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    MAX_SECRET_CHARS,
    MAX_URL_CHARS,
    NATS_DEFAULT_MAX_PAYLOAD,
    ConversationSpec,
    GitProvider,
    MCPConfig,
)

from ..conftest import Stack, running_stack

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
BIG = "x" * 900_000
# A second user, who spends its creation burst here while the local user's stays untouched.
MALLORY_KEY = "tb_mallory_limits_test_key"
BURST = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("limits"),
        TASKBUS_API_KEYS=f"{MALLORY_KEY}=mallory",
        TASKBUS_CREATE_BURST=str(BURST),
        TASKBUS_CREATE_RATE_PER_MINUTE="6",
        TASKBUS_WS_MAX_PER_USER="2",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def conversation_id(stack: Stack) -> str:
    response = httpx.post(
        f"{stack.url}/api/conversations",
        json={"initial_user_msg": "say hello"},
        headers=stack.headers,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]
    return cid


def assert_problem(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    return body


async def assert_list_answers(api: httpx.AsyncClient) -> None:
    for params in ({}, {"limit": 100}):
        response = await api.get("/api/conversations", params=params)
        assert response.status_code == 200, response.text[:500]


def _largest_mcp_config(worst: str) -> MCPConfig:
    """An mcp_config just within MAX_MCP_CONFIG_BYTES as JSON, and valid as the API decodes it."""
    arg = worst * 500  # 3000 bytes of JSON each
    server = {"name": "s", "command": "c", "args": [arg] * 21}
    config = msgspec.convert({"stdio_servers": [server]}, MCPConfig)
    assert MAX_MCP_CONFIG_BYTES - 4000 < len(msgspec.json.encode(config)) <= MAX_MCP_CONFIG_BYTES
    return config


def test_the_largest_valid_command_fits_in_one_nats_message() -> None:
    """Every limit at once, in JSON's worst case of 6 bytes a character ("\\u0001")."""
    worst = "\x01"
    spec = ConversationSpec(
        initial_user_msg=worst * MAX_MESSAGE_CHARS,
        repository=worst * MAX_URL_CHARS,
        git_provider=GitProvider.AZURE_DEVOPS,
        selected_branch=worst * MAX_BRANCH_CHARS,
        conversation_instructions=worst * MAX_INSTRUCTIONS_CHARS,
        mcp_config=_largest_mcp_config(worst),
        title=worst * MAX_NAME_CHARS,
    )
    command = CreateConversation(user_id="u" * 64, conversation_id="c" * 64, spec=spec)
    assert len(encode_command(command)) < NATS_DEFAULT_MAX_PAYLOAD * 0.8
    message = SendMessage(user_id="u", conversation_id="c", content=worst * MAX_MESSAGE_CHARS)
    assert len(encode_command(message)) < NATS_DEFAULT_MAX_PAYLOAD * 0.8


@pytest.mark.parametrize(
    "field",
    [
        "initial_user_msg",
        "repository",
        "selected_branch",
        "git_provider",
        "conversation_instructions",
        "title",
    ],
)
async def test_a_900_kb_field_is_refused_and_the_list_still_answers(
    api: httpx.AsyncClient, field: str
) -> None:
    body = assert_problem(await api.post("/api/conversations", json={field: BIG}), 422)
    assert field in body["detail"]
    await assert_list_answers(api)


async def test_an_oversized_mcp_config_is_refused(api: httpx.AsyncClient) -> None:
    """Each part within its own limit, the whole over MAX_MCP_CONFIG_BYTES: as sent, or only
    once its secrets are sealed (a sealed token is longer than its value)."""
    many_args = {"name": "s", "command": "c", "args": ["a" * 4000] * 17}
    many_env = {"name": "s", "command": "c", "env": {f"K{n}": "v" * 2000 for n in range(40)}}
    for server in (many_args, many_env):
        response = await api.post(
            "/api/conversations", json={"mcp_config": {"stdio_servers": [server]}}
        )
        assert "larger than" in assert_problem(response, 422)["detail"]
    env = {f"K{n}": "v" * MAX_SECRET_CHARS for n in range(MAX_MCP_CONFIG_BYTES // 5000)}
    sealed_too_big = {"stdio_servers": [{"name": "s", "command": "c", "env": env}]}
    for method, path in (("POST", "/api/conversations"), ("PUT", "/api/settings")):
        response = await api.request(method, path, json={"mcp_config": sealed_too_big})
        assert "once its secrets are sealed" in assert_problem(response, 422)["detail"]
    await assert_list_answers(api)


@pytest.mark.parametrize(
    ("mcp_config", "field"),
    [
        ({"garbage": {"command": "rm -rf /"}}, "garbage"),
        ({"stdio_servers": {"name": "x", "command": "y"}}, "stdio_servers"),
        ({"stdio_servers": [{"name": "x", "command": "y", "cwd": "/"}]}, "cwd"),
        ({"stdio_servers": [{"name": "../x", "command": "y"}]}, "name"),
        ({"stdio_servers": [{"name": "x", "command": "y", "env": {"A=B": "v"}}]}, "env"),
        ({"stdio_servers": [{"name": "x", "command": ""}]}, "command"),
        ({"shttp_servers": [{"url": "https://h/mcp", "headers": {}}]}, "headers"),
        ({"sse_servers": [7]}, "sse_servers"),
        (
            {
                "stdio_servers": [
                    {"name": f"s{n}", "command": "c"} for n in range(MAX_MCP_SERVERS + 1)
                ]
            },
            "stdio_servers",
        ),
    ],
)
async def test_an_mcp_config_of_another_shape_is_422_naming_the_field(
    api: httpx.AsyncClient, mcp_config: dict[str, Any], field: str
) -> None:
    for method, path in (("POST", "/api/conversations"), ("PUT", "/api/settings")):
        response = await api.request(method, path, json={"mcp_config": mcp_config})
        detail = assert_problem(response, 422)["detail"]
        assert "mcp_config" in detail and field in detail, detail
    await assert_list_answers(api)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pw@mcp.example.com/mcp",
        "https://mcp.example.com/mcp?api_key=sk-123",
        "file:///etc/passwd",
        "ftp://mcp.example.com/",
    ],
)
async def test_an_mcp_url_with_a_credential_or_another_scheme_is_422(
    api: httpx.AsyncClient, url: str
) -> None:
    for servers in ([url], [{"url": url}]):
        response = await api.post(
            "/api/conversations", json={"mcp_config": {"shttp_servers": servers}}
        )
        assert "mcp_config.shttp_servers[0]" in assert_problem(response, 422)["detail"]


async def test_another_users_sealed_mcp_secret_is_refused(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """Settings show MCP secrets sealed; a token of Mallory's cannot be planted as the local
    user's (it would open as Mallory's secret in the local user's sandbox)."""
    config = {"shttp_servers": [{"url": "https://mcp.example.com/mcp", "api_key": "mallory-key"}]}
    async with stack.client(MALLORY_KEY) as mallory:
        stored = await mallory.put("/api/settings", json={"mcp_config": config})
        assert stored.status_code == 200, stored.text
    assert "mallory-key" not in stored.text
    token = stored.json()["mcp_config"]["shttp_servers"][0]["api_key"]
    assert token.startswith("sealed:v1:")
    planted = {"shttp_servers": [{"url": "https://mcp.example.com/mcp", "api_key": token}]}
    for method, path in (("POST", "/api/conversations"), ("PUT", "/api/settings")):
        response = await api.request(method, path, json={"mcp_config": planted})
        assert "not yours" in assert_problem(response, 422)["detail"]
    # Her own token posted back (a client saving the settings it read) is kept as it is.
    async with stack.client(MALLORY_KEY) as mallory:
        again = await mallory.put("/api/settings", json={"mcp_config": planted})
        assert again.status_code == 200, again.text
        assert again.json()["mcp_config"]["shttp_servers"][0]["api_key"] == token


async def test_a_body_larger_than_a_nats_message_is_413(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/conversations", json={"initial_user_msg": "x" * 1_100_000})
    assert assert_problem(response, 413)["max_bytes"] == NATS_DEFAULT_MAX_PAYLOAD
    await assert_list_answers(api)


@pytest.mark.parametrize("field", ["llm_model", "llm_api_key", "llm_base_url"])
async def test_oversized_settings_strings_are_refused(api: httpx.AsyncClient, field: str) -> None:
    assert_problem(await api.put("/api/settings", json={field: BIG}), 422)
    assert (await api.get("/api/settings")).status_code == 200


async def test_an_oversized_message_is_refused(
    api: httpx.AsyncClient, conversation_id: str
) -> None:
    path = f"/api/conversations/{conversation_id}/message"
    assert_problem(await api.post(path, json={"message": BIG}), 422)
    events_path = f"/api/conversations/{conversation_id}/events"
    for _ in range(60):  # the event-store's projection trails the log by a batch
        events = await api.get(events_path, params={"limit": 100})
        if events.status_code != 404:
            break
        await asyncio.sleep(0.5)
    assert events.status_code == 200, events.text
    assert all(len(event.get("content") or "") < 1000 for event in events.json()["events"])


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            "/api/conversations",
            '{"mcp_config": {"stdio_servers": [{"name": "s", '
            '"command": "c", "args": ' + _nested(200_000) + "}]}}",
        ),
        ("PUT", "/api/settings", '{"mcp_config": {"stdio_servers": ' + _nested(200_000) + "}}"),
        ("POST", "/api/conversations", '{"mcp_config": {"sse_servers": ' + _nested(17) + "}}"),
        ("POST", "/api/conversations", '{"extra": ' + _nested(200_000) + "}"),
        ("PUT", "/api/settings", '{"extra": ' + _nested(200_000) + "}"),
    ],
)
async def test_deeply_nested_json_is_422_not_500(
    api: httpx.AsyncClient, method: str, path: str, body: str
) -> None:
    headers = {"Content-Type": "application/json"}
    response = await api.request(method, path, content=body, headers=headers)
    assert_problem(response, 422)
    await assert_list_answers(api)


async def test_deeply_nested_message_bodies_are_422(
    api: httpx.AsyncClient, conversation_id: str
) -> None:
    body = '{"extra": ' + _nested(200_000) + ', "message": "hi"}'
    response = await api.post(
        f"/api/conversations/{conversation_id}/message",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert_problem(response, 422)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/conversations", {"title": "t" * 5000}),
        ("/api/conversations", {"repository": "r" * 5000}),
        ("/api/conversations", {"page_id": "p" * 5000}),
        ("/api/conversations", {"created_after": "0117-01-01T00:00:00Z"}),
        ("/api/analytics/cost", {"until": "0117-01-01T00:00:00Z"}),
        ("/api/analytics/durations", {"since": "9999-12-31T23:59:59Z"}),
        ("/api/analytics/event-kinds", {"conversation_id": "c" * 5000}),
    ],
)
async def test_oversized_or_out_of_range_query_parameters_are_422(
    api: httpx.AsyncClient, path: str, params: dict[str, str]
) -> None:
    assert_problem(await api.get(path, params=params), 422)


async def test_event_query_parameters_are_bounded(
    api: httpx.AsyncClient, conversation_id: str
) -> None:
    path = f"/api/conversations/{conversation_id}/events"
    for params in (
        {"query": "q" * 5000},
        {"kind": ",".join(["K"] * 500)},
        {"until": "0117-01-01T00:00:00Z"},
    ):
        assert_problem(await api.get(path, params=params), 422)


async def test_a_burst_of_creates_is_cut_off_with_429_and_retry_after(stack: Stack) -> None:
    async with stack.client(MALLORY_KEY, timeout=120) as mallory:
        responses = await asyncio.gather(
            *(mallory.post("/api/conversations", json={"title": f"t{n}"}) for n in range(150))
        )
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] * BURST + [429] * (150 - BURST), statuses
        for response in responses:
            if response.status_code == 429:
                body = assert_problem(response, 429)
                assert int(response.headers["Retry-After"]) >= 1
                assert body["retry_after_seconds"] == int(response.headers["Retry-After"])
        listed = await mallory.get("/api/conversations", params={"limit": 100})
        assert len(listed.json()["results"]) == BURST
    # Another user's burst is untouched.
    async with stack.client() as local:
        response = await local.post("/api/conversations", json={"title": "mine"})
        assert response.status_code == 201, response.text


async def test_a_user_holds_at_most_the_allowed_websockets(
    stack: Stack, conversation_id: str
) -> None:
    url = f"{stack.ws_url}/api/conversations/{conversation_id}/events?after_id=-1"
    async with connect(url, additional_headers=stack.headers) as first:
        async with connect(url, additional_headers=stack.headers):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=stack.headers):
                    pass
            response = refused.value.response
            assert response.status_code == 429
            problem = msgspec.json.decode(response.body or b"{}")
            assert problem["type"] == "urn:taskbus:problem:too-many-websockets"
        # Closing one frees its place, once the gateway has seen the close (a moment later).
        deadline = time.monotonic() + 10
        while True:
            try:
                again = await connect(url, additional_headers=stack.headers)
                break
            except InvalidStatus as still_full:
                assert still_full.response.status_code == 429
                assert time.monotonic() < deadline, "the closed socket's place was never freed"
                await asyncio.sleep(0.1)
        async with again:
            await asyncio.wait_for(again.recv(), 30)
        await asyncio.wait_for(first.recv(), 30)
