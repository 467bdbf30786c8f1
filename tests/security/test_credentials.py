"""Credentials never enter the log: every spelling of a credential in a repository URL is refused
with a 422 before anything is stored, and a credential that reaches an output is masked.

Issue 8 found tokens in query strings (`?access_token=`), in scp-style URLs and in `git://user@`
accepted and then stored in six kinds of event and in the runner's log. The policy is
`taskbus.contracts.redaction`'s; here it is attacked through the real stack, and the whole data
dir (the NATS store, ClickHouse, every service's log) is searched for the secret afterwards.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from taskbus.contracts.redaction import redact, repository_credential

from ..conftest import Stack

pytestmark = pytest.mark.slow

SECRET = "s3cretTOKENvalue42"
GH_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 2

# Every form issue 8 names, and their disguises.
REFUSED = [
    f"https://{SECRET}@github.com/acme/web.git",  # token as user
    f"https://oauth2:{SECRET}@gitlab.com/acme/web.git",  # user:password
    f"HTTPS://x-access-token:{SECRET}@github.com/acme/web.git",  # upper-case scheme
    f"http://bob:{SECRET}@git.example.org/web.git",
    f"https://github.com/acme/web.git?access_token={SECRET}",  # query strings
    f"https://gitlab.com/acme/web.git?private_token={SECRET}",
    f"https://example.org/web.git?token={SECRET}",
    f"https://example.org/web.git?ref=main&x={SECRET}",  # any query: nothing legitimate
    f"https://example.org/web.git#token={SECRET}",  # fragments
    f"bob:{SECRET}@github.com:acme/web.git",  # scp-style with a password
    f"{SECRET}{SECRET}@github.com:acme/web.git",  # scp-style with a token as user
    f"{GH_TOKEN}@github.com:acme/web.git",  # a GitHub token as the scp user
    f"ssh://git:{SECRET}@github.com/acme/web.git",  # ssh with a password
    f"ssh://{GH_TOKEN}@github.com/acme/web.git",
    "git://bob@example.org/web.git",  # git:// has no authentication: a user is a smell
    f"git://bob:{SECRET}@example.org/web.git",
    f"https://github.com/acme/{GH_TOKEN}/web.git",  # a known token anywhere
    f"https://bob%3A{SECRET}@github.com/acme/web.git",  # percent-encoded ':'
    quote(f"https://{SECRET}@github.com/acme/web.git", safe=""),  # fully percent-encoded
    quote(quote(f"https://{SECRET}@github.com/acme/web.git", safe=""), safe=""),  # twice
    f"https://github.com/acme/web.git%3Faccess_token%3D{SECRET}",  # encoded query
    f"https://github.com/acme/web.git\n@{SECRET}",  # control characters
]
ACCEPTED = [
    "https://github.com/acme/web.git",
    "http://git.example.org/web",
    "ssh://git@github.com/acme/web.git",  # SSH's user name is not a credential
    "ssh://git@github.com:22/acme/web.git",
    "git+ssh://deploy@git.example.org/web.git",
    "git@github.com:acme/web.git",  # the normal scp-style SSH form
    "github.com:acme/web.git",
    "git://example.org/web.git",
    "/srv/repos/web",
    "file:///srv/repos/web",
    "https://dev.azure.com/org/My%20Project/_git/web",  # an encoded space is a path
]


@pytest.mark.parametrize("url", REFUSED)
def test_every_credential_form_is_refused(url: str) -> None:
    assert repository_credential(url) is not None


@pytest.mark.parametrize("url", ACCEPTED)
def test_plain_repository_urls_are_accepted(url: str) -> None:
    assert repository_credential(url) is None


@pytest.mark.parametrize(
    "text",
    [
        f"fatal: could not read from 'https://bob:{SECRET}@git.example.com/r.git'",
        f"fatal: repository 'https://example.org/r.git?access_token={SECRET}' not found",
        f"cloning bob:{SECRET}@github.com:acme/web.git",
        f"error: private_token={SECRET} rejected",
        f"password: {SECRET}",
        f"remote: token {GH_TOKEN} expired",
    ],
)
def test_credentials_in_output_are_masked(text: str) -> None:
    for secret in (SECRET, GH_TOKEN):
        assert secret not in redact(text)


def test_redaction_leaves_clean_text_alone() -> None:
    for text in ["git clone https://github.com/acme/web.git done", "/srv/repos/plain.git", "ok"]:
        assert redact(text) == text


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]


async def _conversation_ids(api: httpx.AsyncClient) -> set[str]:
    response = await api.get("/api/conversations", params={"limit": 100})
    return {conversation["conversation_id"] for conversation in response.json()["results"]}


async def test_credential_urls_are_422_and_nothing_is_stored(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    before = await _conversation_ids(api)
    for url in REFUSED:
        response = await api.post(
            "/api/conversations", json={"initial_user_msg": "clone it", "repository": url}
        )
        assert response.status_code == 422, (url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert SECRET not in response.text and GH_TOKEN not in response.text
    assert await _conversation_ids(api) == before
    # Not in the log, not in ClickHouse, not in any service's log line.
    for secret in (SECRET, GH_TOKEN):
        assert _files_containing(stack.data_dir, secret.encode()) == []


async def test_a_credential_echoed_by_the_gateway_is_masked(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    # A token in a path parameter is echoed in the 404's detail and logged by uvicorn's access
    # line; a credential URL in a query parameter is logged too. Both come out masked.
    response = await api.get(f"/api/conversations/{GH_TOKEN}")
    assert response.status_code == 404
    assert GH_TOKEN not in response.text
    listed = await api.get(
        "/api/conversations", params={"repository": f"https://bob:{SECRET}@example.org/r.git"}
    )
    assert listed.status_code == 200
    for secret in (SECRET, GH_TOKEN):
        assert _files_containing(stack.data_dir / "logs", secret.encode()) == []
