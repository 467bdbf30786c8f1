"""Users' secrets and git tokens, attacked through a real stack: values are write-only, sealed
in NATS for their user and name, invisible to other users, and bad input is a 422 problem."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from nats.js.errors import KeyNotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.secret_box import SecretBox, SecretError, is_sealed
from taskbus.contracts.specs import GitProvider
from taskbus.contracts.user_secrets import (
    MAX_SECRET_VALUE_BYTES,
    UserSecrets,
    custom_secret_context,
    decode_user_secrets,
    provider_token_context,
)
from taskbus.devtools import bus_auth

from ..conftest import MALLORY_KEY, Stack
from ..public_api import events_until_final, metrics_texts, open_events_ws

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"


async def stored(stack: Stack, user: str) -> UserSecrets:
    """The user's entry in KV `taskbus_secrets`, as the operator reads it."""
    nc = await connect(stack.nats_url, "secrets-test", stack.bus_credential(bus_auth.ADMIN))
    try:
        bucket = await nc.jetstream().key_value(subjects.SECRETS_BUCKET)
        try:
            entry = await bucket.get(user)
        except KeyNotFoundError:
            return UserSecrets()
        return decode_user_secrets(entry.value or b"{}")
    finally:
        await nc.drain()


def box(stack: Stack) -> SecretBox:
    found = SecretBox.from_settings(None, str(stack.data_dir / "secrets.key"))
    assert found is not None
    return found


def assert_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["status"] == status


async def test_secrets_are_write_only_sealed_and_follow_create_update_delete(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    value, new_value = "v-" + uuid.uuid4().hex, "n-" + uuid.uuid4().hex
    answers = []
    created = await api.post(
        "/api/secrets",
        json={"name": "DEPLOY_KEY", "value": value, "description": "for deploys"},
    )
    assert created.status_code == 201, created.text
    assert created.json() == {"message": "Secret created successfully"}
    listed = await api.get("/api/secrets")
    assert listed.json() == {
        "custom_secrets": [
            {"name": "DEPLOY_KEY", "description": "for deploys", "expose_in_sandbox": True}
        ]
    }
    assert_problem(await api.post("/api/secrets", json={"name": "DEPLOY_KEY", "value": "x"}), 409)
    # OpenHands' rename keeps the value, sealed anew for the new name.
    renamed = await api.put(
        "/api/secrets/DEPLOY_KEY", json={"name": "RELEASE_KEY", "description": "renamed"}
    )
    assert renamed.status_code == 200, renamed.text
    entry = await stored(stack, "local")
    assert set(entry.custom_secrets) == {"RELEASE_KEY"}
    sealed = entry.custom_secrets["RELEASE_KEY"].value
    assert is_sealed(sealed) and value not in sealed
    assert box(stack).open(sealed, custom_secret_context("local", "RELEASE_KEY")) == value
    with pytest.raises(SecretError):  # bound to its user and name
        box(stack).open(sealed, custom_secret_context("mallory", "RELEASE_KEY"))
    changed = await api.put(
        "/api/secrets/RELEASE_KEY",
        json={"name": "RELEASE_KEY", "value": new_value, "expose_in_sandbox": False},
    )
    assert changed.status_code == 200, changed.text
    secret = (await stored(stack, "local")).custom_secrets["RELEASE_KEY"]
    assert secret.description == "renamed" and secret.expose_in_sandbox is False
    assert box(stack).open(secret.value, custom_secret_context("local", "RELEASE_KEY")) == new_value
    answers += [created, listed, renamed, changed, await api.get("/api/secrets")]
    assert all(value not in a.text and new_value not in a.text for a in answers)
    deleted = await api.delete("/api/secrets/RELEASE_KEY")
    assert deleted.status_code == 200, deleted.text
    assert (await api.get("/api/secrets")).json() == {"custom_secrets": []}
    assert_problem(await api.delete("/api/secrets/RELEASE_KEY"), 404)
    assert_problem(await api.put("/api/secrets/RELEASE_KEY", json={"name": "X"}), 404)


async def test_git_tokens_are_sealed_and_merged_as_openhands_does(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    token = "ghp_" + uuid.uuid4().hex
    added = await api.post(
        "/api/add-git-providers",
        json={"provider_tokens": {"github": {"token": token, "host": "ghe.example.com"}}},
    )
    assert added.status_code == 200, added.text
    assert added.json() == {"message": "Git providers stored"}
    # No token: the stored one stays, with the new host.
    moved = await api.post(
        "/api/add-git-providers",
        json={"provider_tokens": {"github": {"token": "", "host": "ghe2.example.com"}}},
    )
    assert moved.status_code == 200, moved.text
    entry = (await stored(stack, "local")).provider_tokens[GitProvider.GITHUB]
    assert entry.host == "ghe2.example.com" and token not in entry.token
    assert (
        box(stack).open(entry.token, provider_token_context("local", GitProvider.GITHUB)) == token
    )
    settings = await api.get("/api/settings")
    # OpenHands' frontend reads which providers are connected, and never the token.
    assert settings.json()["provider_tokens_set"] == {"github": "ghe2.example.com"}
    assert token not in added.text + moved.text + settings.text
    unset = await api.post("/api/unset-provider-tokens")
    assert unset.status_code == 200, unset.text
    assert (await stored(stack, "local")).provider_tokens == {}
    assert (await api.get("/api/settings")).json()["provider_tokens_set"] == {}


async def test_another_users_secrets_are_never_visible(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    created = await api.post("/api/secrets", json={"name": "MINE_ONLY", "value": "mine"})
    assert created.status_code == 201, created.text
    async with stack.client(MALLORY_KEY) as mallory:
        assert (await mallory.get("/api/secrets")).json() == {"custom_secrets": []}
        assert_problem(await mallory.delete("/api/secrets/MINE_ONLY"), 404)
        assert_problem(await mallory.put("/api/secrets/MINE_ONLY", json={"name": "STOLEN"}), 404)
        # Mallory's secret of the same name is Mallory's own.
        own = await mallory.post("/api/secrets", json={"name": "MINE_ONLY", "value": "theirs"})
        assert own.status_code == 201, own.text
    assert [s["name"] for s in (await api.get("/api/secrets")).json()["custom_secrets"]] == [
        "MINE_ONLY"
    ]
    mine = (await stored(stack, "local")).custom_secrets["MINE_ONLY"].value
    assert box(stack).open(mine, custom_secret_context("local", "MINE_ONLY")) == "mine"
    assert (await api.delete("/api/secrets/MINE_ONLY")).status_code == 200
    assert (await stored(stack, "mallory")).custom_secrets.keys() == {"MINE_ONLY"}


async def test_concurrent_writes_lose_nothing(api: httpx.AsyncClient) -> None:
    names = [f"CONCURRENT_{n}" for n in range(8)]
    answers = await asyncio.gather(
        *(api.post("/api/secrets", json={"name": name, "value": name}) for name in names)
    )
    assert [a.status_code for a in answers] == [201] * len(names), [a.text for a in answers]
    listed = {s["name"] for s in (await api.get("/api/secrets")).json()["custom_secrets"]}
    assert set(names) <= listed
    await asyncio.gather(*(api.delete(f"/api/secrets/{name}") for name in names))


async def test_no_secret_reaches_a_metric(stack: Stack, api: httpx.AsyncClient) -> None:
    """An attacker who can scrape /metrics (often less guarded than the API) learns no secret:
    not from a label, even where labels could come from the request (paths, names, a task that
    runs with the secret in its sandbox)."""
    value, token = "tbsecret" + uuid.uuid4().hex, "ghp_" + uuid.uuid4().hex
    created = await api.post("/api/secrets", json={"name": "METRIC_BAIT", "value": value})
    assert created.status_code == 201, created.text
    added = await api.post(
        "/api/add-git-providers", json={"provider_tokens": {"github": {"token": token}}}
    )
    assert added.status_code == 200, added.text
    for path in (f"/api/secrets/{value}", f"/api/conversations/{value}", f"/{token}"):
        assert (await api.get(path)).status_code in (404, 405, 422)
    task = await api.post(
        "/api/conversations", json={"initial_user_msg": f"echo $METRIC_BAIT {value}"}
    )
    assert task.status_code in (200, 201), task.text
    async with open_events_ws(stack, task.json()["conversation_id"], -1) as ws:
        await events_until_final(ws)
    scraped = await metrics_texts(api)
    assert set(scraped) == {"gateway", "session_manager", "runtime_runner", "event_store"}
    for process, text in scraped.items():
        assert "taskbus_" in text, process
        assert value not in text and token not in text, process
    assert (await api.delete("/api/secrets/METRIC_BAIT")).status_code == 200
    assert (await api.post("/api/unset-provider-tokens")).status_code == 200


MARK = "zz-value-zz"  # never echoed in a problem
BAD_SECRETS: list[dict[str, Any]] = [
    {"name": "1STARTS_WITH_A_DIGIT", "value": MARK},
    {"name": "HAS-DASH", "value": MARK},
    {"name": "PATH", "value": MARK},  # the sandbox's own
    {"name": "PROMPT_COMMAND", "value": MARK},
    {"name": "TASKBUS_SANDBOX", "value": MARK},
    {"name": "OK_NAME", "value": ""},
    {"name": "OK_NAME", "value": MARK + "\x00"},
    {"name": "OK_NAME", "value": MARK + "é" * (MAX_SECRET_VALUE_BYTES // 2)},  # bytes, not chars
    {"name": "OK_NAME", "value": MARK, "unknown": 1},
    {"name": "OK_NAME"},
]


@pytest.mark.parametrize("body", BAD_SECRETS)
async def test_bad_secrets_are_422_problems(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await api.post("/api/secrets", json=body)
    assert_problem(response, 422)
    assert MARK not in response.text


@pytest.mark.parametrize(
    "tokens",
    [
        {"sourceforge": {"token": "t"}},
        {"github": {"token": "has space"}},
        {"github": {"token": "line\nbreak"}},
        {"github": {"token": "t", "host": "evil.example/path"}},
        {"github": {"token": "t", "host": "user@evil.example"}},
        {"github": {"token": "t", "host": "ftp://evil.example"}},
    ],
)
async def test_bad_provider_tokens_are_422_problems(
    api: httpx.AsyncClient, tokens: dict[str, Any]
) -> None:
    assert_problem(await api.post("/api/add-git-providers", json={"provider_tokens": tokens}), 422)


@pytest.mark.parametrize(
    "body",
    [
        {"repository": "octo/hello", "git_provider": "svn"},
        {"repository": "octo/hello/extra", "git_provider": "github"},
        {"repository": "org/repo", "git_provider": "azure_devops"},
        {"repository": "file:///etc", "git_provider": "github"},
    ],
)
async def test_a_repository_its_provider_cannot_have_is_a_422(
    api: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    assert_problem(await api.post("/api/conversations", json={"title": "t", **body}), 422)


async def test_the_command_stream_carries_only_sealed_values(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    value, token = "cv-" + uuid.uuid4().hex, "glpat-" + uuid.uuid4().hex
    nc = await connect(stack.nats_url, "secrets-test", stack.bus_credential(bus_auth.ADMIN))
    try:
        commands = await nc.subscribe(subjects.ALL_COMMANDS)
        assert (await api.post("/api/secrets", json={"name": "CMD", "value": value})).is_success
        added = await api.post(
            "/api/add-git-providers", json={"provider_tokens": {"gitlab": {"token": token}}}
        )
        assert added.is_success
        published = []
        while True:
            try:
                published.append((await commands.next_msg(timeout=1)).data)
            except TimeoutError:
                break
    finally:
        await nc.drain()
    assert len(published) >= 2
    assert not [data for data in published if value.encode() in data or token.encode() in data]
    assert all(b"sealed:v1:" in data for data in published)
    await api.delete("/api/secrets/CMD")
    await api.post("/api/unset-provider-tokens")
