"""LLM settings that cannot leak the operator's key, attacked through a real stack.

Issue 8 found: a user who set `llm_base_url` to their own listener received
`Authorization: Bearer <operator key>`, session-manager would POST to loopback and private
addresses, and users' LLM keys sat in plaintext in the `taskbus_settings` bucket.

The operator's model here is a scripted model in this process, with a key of its own. The
user's "own listener" is another one; loopback is hard to avoid offline, so the operator
allow-lists it by IP address, the documented way to allow a private endpoint.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
import pytest
from nats.js.errors import KeyNotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.llm_endpoints import (
    DEFAULT_ALLOWED_BASE_URLS,
    AllowList,
    EndpointRefused,
    check_destination,
    is_public,
)
from taskbus.contracts.secret_box import SecretBox, SecretError, generate_key, is_sealed
from taskbus.contracts.specs import UserSettings
from taskbus.devtools import bus_auth
from taskbus.devtools.scripted_llm import ScriptedLLM
from taskbus.gateway.problems import Problem
from taskbus.gateway.user_settings import SettingsPolicy, admissible
from taskbus.session_manager.llm import NO_KEY

from ..conftest import Stack, running_stack

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
OPERATOR_KEY = "sk-operator-" + uuid.uuid4().hex
FINISH = {"steps": [{"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]}]}


@pytest.fixture(scope="module")
def operator_llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(FINISH) as llm:
        yield llm


@pytest.fixture(scope="module")
def listener() -> Iterator[ScriptedLLM]:
    """The user's own endpoint: it records every Authorization header it is sent."""
    with ScriptedLLM(FINISH) as llm:
        yield llm


def by_name(url: str) -> str:
    return url.replace("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, operator_llm: ScriptedLLM, listener: ScriptedLLM
) -> Iterator[Stack]:
    allowed = f"{DEFAULT_ALLOWED_BASE_URLS},{listener.url},{by_name(listener.url)}"
    with running_stack(
        tmp_path_factory.mktemp("llm-settings"),
        TASKBUS_LLM_MODEL="openai/scripted",
        TASKBUS_LLM_BASE_URL=operator_llm.url,
        TASKBUS_LLM_API_KEY=OPERATOR_KEY,
        TASKBUS_LLM_ALLOWED_BASE_URLS=allowed,
    ) as running:
        yield running


async def put_settings(api: httpx.AsyncClient, **settings: Any) -> httpx.Response:
    return await api.put("/api/settings", json=settings)


async def run_to_end(api: httpx.AsyncClient) -> dict[str, Any]:
    created = await api.post("/api/conversations", json={"initial_user_msg": "Say hi."})
    assert created.status_code == 201, created.text
    cid = created.json()["conversation_id"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        info: dict[str, Any] = (await api.get(f"/api/conversations/{cid}")).json()
        if info["taskbus_status"] in ("FINISHED", "ERROR", "STOPPED"):
            return info
        await asyncio.sleep(0.3)
    raise AssertionError(f"conversation {cid} did not end")


def authorizations(llm: ScriptedLLM) -> list[str | None]:
    return [request.authorization for request in llm.player.requests]


# --- through the stack ------------------------------------------------------------------------

REFUSED_BASE_URLS = [
    "http://127.0.0.1:1/v1",  # loopback, not listed
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://10.0.0.1/v1",
    "http://192.168.1.1/v1",
    "http://0.0.0.0:80/v1",
    "http://[::1]:8080/v1",
    "http://[fd00::1]/v1",  # IPv6 unique local
    "http://[::ffff:127.0.0.1]/v1",  # v4-mapped loopback
    "http://2130706433/v1",  # 127.0.0.1 as one number
    "http://127.1/v1",
    "https://api.openai.com.evil.example/v1",  # a listed host as a prefix of another
    "https://api.openai.com@127.0.0.1/v1",  # a listed host as userinfo
    "https://user:pw@api.openai.com/v1",
    "http://api.openai.com/v1",  # the listed scheme is https
    "https://api.openai.com:8443/v1",  # and its port 443
    "https://api.openai.com/v1/../../admin",
    "https://api.openai.com/v1?x=1",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_x",
]


@pytest.mark.parametrize("base_url", REFUSED_BASE_URLS)
async def test_a_private_or_unlisted_base_url_gets_422(
    api: httpx.AsyncClient, base_url: str
) -> None:
    response = await put_settings(api, llm_model="openai/gpt-4o", llm_base_url=base_url)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert (await api.get("/api/settings")).json()["llm_base_url"] is None


async def test_a_listed_name_that_resolves_to_loopback_gets_422(
    api: httpx.AsyncClient, listener: ScriptedLLM
) -> None:
    """Listing a host by name allows it only while it resolves to public addresses."""
    response = await put_settings(
        api, llm_model="openai/scripted", llm_base_url=by_name(listener.url)
    )
    assert response.status_code == 422, response.text
    assert "loopback, private or link-local" in response.json()["detail"]


@pytest.mark.parametrize(
    "settings",
    [
        {"llm_base_url": "https://api.openai.com/v1"},  # a set names its model
        {"llm_api_key": "sk-user"},
        {"llm_model": "gpt-4o"},  # and the model its provider
        {"llm_model": "bedrock/anthropic.claude-v2"},  # signs with the service's AWS identity
        {"llm_model": "ollama/llama3"},  # whose default endpoint is localhost
        {"llm_model": "hosted_vllm/x"},  # an OpenAI-compatible server needs its URL
    ],
)
async def test_an_llm_set_that_could_borrow_the_services_credentials_gets_422(
    api: httpx.AsyncClient, settings: dict[str, str]
) -> None:
    response = await put_settings(api, **settings)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM


async def test_the_operator_key_never_reaches_a_users_listener(
    api: httpx.AsyncClient, operator_llm: ScriptedLLM, listener: ScriptedLLM
) -> None:
    # Sanity: the operator's key is real and used for users without settings of their own.
    await put_settings(api)
    assert (await run_to_end(api))["taskbus_status"] == "FINISHED"
    assert set(authorizations(operator_llm)) == {f"Bearer {OPERATOR_KEY}"}
    operator_calls = len(operator_llm.player.requests)

    # The user's endpoint without a key of theirs: it gets no key at all.
    put = await put_settings(api, llm_model="openai/scripted", llm_base_url=listener.url)
    assert put.status_code == 200, put.text
    assert (await run_to_end(api))["taskbus_status"] == "FINISHED"
    assert authorizations(listener) == [f"Bearer {NO_KEY}"]

    # With the user's key: that key only.
    user_key = "sk-user-" + uuid.uuid4().hex
    put = await put_settings(
        api, llm_model="openai/scripted", llm_base_url=listener.url, llm_api_key=user_key
    )
    assert put.status_code == 200, put.text
    assert (await run_to_end(api))["taskbus_status"] == "FINISHED"
    assert authorizations(listener)[1:] == [f"Bearer {user_key}"]

    assert len(operator_llm.player.requests) == operator_calls  # nothing more went there
    for request in listener.player.requests:
        assert OPERATOR_KEY not in msgspec.json.encode(request.body).decode()
    await put_settings(api)


def service_environments(stack: Stack) -> dict[str, list[bytes]]:
    """Each service process' environment entries, read from /proc."""
    environments = {}
    for name in ("session-manager", "runtime-runner", "event-store", "gateway"):
        pid = (stack.data_dir / "pids" / f"{name}.pid").read_text().strip()
        environments[name] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return environments


async def test_only_session_manager_holds_the_operator_key(stack: Stack) -> None:
    """The runner (whose sandboxes run untrusted code), event-store and gateway never get the
    operator's LLM key, nor event-store the key that seals users' keys. The runner holds that
    key (it opens users' git tokens and sandbox secrets at sandbox start), so its NATS user may
    not read the settings bucket, where users' sealed LLM keys are."""
    held = service_environments(stack)
    assert f"TASKBUS_LLM_API_KEY={OPERATOR_KEY}".encode() in held["session-manager"]
    for name in ("runtime-runner", "event-store", "gateway"):
        assert not any(OPERATOR_KEY.encode() in entry for entry in held[name]), name
    assert not any(entry.startswith(b"TASKBUS_SECRETS_KEY") for entry in held["event-store"])
    for name in ("gateway", "runtime-runner"):
        assert any(entry.startswith(b"TASKBUS_SECRETS_KEY") for entry in held[name]), name
    admin = await connect(stack.nats_url, "security-test", stack.bus_credential(bus_auth.ADMIN))
    try:
        await (await admin.jetstream().key_value(subjects.SETTINGS_BUCKET)).put(
            "victim", b'{"llm_model": "openai/gpt-4o", "llm_api_key": "sealed:v1:AAAA"}'
        )
    finally:
        await admin.drain()
    runner = await connect(
        stack.nats_url, "security-test", stack.bus_credential(bus_auth.RUNTIME_RUNNER)
    )
    try:
        settings = await runner.jetstream().key_value(subjects.SETTINGS_BUCKET)
        with pytest.raises(TimeoutError):  # a denied request is never answered
            await asyncio.wait_for(settings.get("victim"), 2)
        secrets = await runner.jetstream().key_value(subjects.SECRETS_BUCKET)
        with pytest.raises(KeyNotFoundError):  # its own bucket answers
            await asyncio.wait_for(secrets.get("victim"), 5)
    finally:
        await runner.drain()


async def test_llm_keys_are_sealed_in_the_settings_bucket_and_the_command_stream(
    api: httpx.AsyncClient, stack: Stack, listener: ScriptedLLM
) -> None:
    user_key = "sk-user-" + uuid.uuid4().hex
    nc = await connect(stack.nats_url, "security-test", stack.bus_credential(bus_auth.ADMIN))
    try:
        commands = await nc.subscribe(subjects.ALL_COMMANDS)
        put = await put_settings(
            api, llm_model="openai/scripted", llm_base_url=listener.url, llm_api_key=user_key
        )
        assert put.status_code == 200, put.text
        assert put.json()["llm_api_key_set"] is True and user_key not in put.text
        published: list[bytes] = []
        while True:
            try:
                published.append((await commands.next_msg(timeout=1)).data)
            except nats.errors.TimeoutError:
                break
        kv = await nc.jetstream().key_value(subjects.SETTINGS_BUCKET)
        history = [entry.value or b"" for entry in await kv.history("local")]
    finally:
        await nc.drain()

    assert any(b"UpdateSettings" in data for data in published)
    assert history
    for raw in [*published, *history]:
        assert user_key.encode() not in raw
    stored = msgspec.json.decode(history[-1], type=UserSettings)
    assert stored.llm_api_key is not None and is_sealed(stored.llm_api_key)
    await put_settings(api)


# --- the pieces, without the stack ------------------------------------------------------------


async def test_without_a_secrets_key_a_user_key_is_refused_not_stored_in_plaintext() -> None:
    policy = SettingsPolicy(allowed=AllowList(DEFAULT_ALLOWED_BASE_URLS), box=None)
    wanted = UserSettings(llm_model="openai/gpt-4o", llm_api_key="sk-user")
    with pytest.raises(Problem) as refused:
        await admissible(wanted, "u", policy)
    assert refused.value.status == 422
    assert "TASKBUS_SECRETS_KEY_FILE" in refused.value.detail
    # Settings without a key need no secrets key.
    assert await admissible(UserSettings(max_iterations=3), "u", policy) == UserSettings(
        max_iterations=3
    )


def test_a_sealed_key_opens_only_with_its_key_and_for_its_user() -> None:
    box = SecretBox(generate_key())
    sealed = box.seal("sk-user", "alice")
    assert "sk-user" not in sealed and box.open(sealed, "alice") == "sk-user"
    with pytest.raises(SecretError):
        box.open(sealed, "mallory")  # moved into another user's settings
    with pytest.raises(SecretError):
        SecretBox(generate_key()).open(sealed, "alice")
    with pytest.raises(SecretError):
        box.open("sk-plaintext", "alice")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 around 127.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # teredo around 10.0.0.1
    ],
)
def test_non_public_addresses_are_recognised(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


def test_public_addresses_pass() -> None:
    assert is_public(ipaddress.ip_address("104.18.6.192"))
    assert is_public(ipaddress.ip_address("2606:4700::6812:6c0"))


async def test_an_ip_listed_by_the_operator_is_allowed_and_nothing_else_on_that_host() -> None:
    allowed = AllowList("http://10.0.0.5:8000/v1")
    await check_destination("http://10.0.0.5:8000/v1", allowed)
    await check_destination("http://10.0.0.5:8000/v1/", allowed)
    for other in ("http://10.0.0.5:8001/v1", "http://10.0.0.5:8000/v2", "http://10.0.0.6:8000/v1"):
        with pytest.raises(EndpointRefused):
            await check_destination(other, allowed)
