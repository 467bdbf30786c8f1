"""A private repository behind a git server that wants a token, through the whole stack.

The server is `git http-backend` (smart HTTP) behind an authenticating HTTP server in this
process, on 127.0.0.1: it serves only requests carrying GitHub's user name `x-access-token` and
the user's token. The user stores the token with the token's host pointing at it (as for GitHub
Enterprise) and a sandbox secret; the conversation names `owner/private` with `git_provider:
github`. The clone works with the token and fails clearly without it, and the token is nowhere
else: not in an event, a log, any file of the stack's data dir (workspace and its .git
included), an answer, nor the sandbox's environment.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.status import ENDED_STATUSES
from taskbus.contracts.streams import read_batch
from taskbus.devtools import bus_auth

from .conftest import Stack, running_stack

pytestmark = pytest.mark.slow

TOKEN = "ghp_" + uuid.uuid4().hex
SANDBOX_VALUE = "sv-" + uuid.uuid4().hex
OTHER_KEY = "tb_nobody_git_credentials_key"
MASK = "<secret_hidden>"
SCRIPT = {
    "steps": [
        {
            "tool_calls": [
                {
                    "name": "execute_bash",
                    "arguments": {"command": "cat README.md; git remote -v; cat .git/config"},
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "name": "execute_bash",
                    "arguments": {
                        "command": "env | sort; echo ---; tr '\\0' '\\n' < /proc/$$/environ | sort"
                    },
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "name": "execute_bash",
                    "arguments": {"command": 'echo "secret is $SANDBOX_SECRET"'},
                }
            ]
        },
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]},
    ]
}


class GitServer:
    """Smart HTTP over `git http-backend`, for requests with the expected Basic credential."""

    def __init__(self, root: Path, username: str, token: str) -> None:
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"{username}:{token}".encode()).decode()
        self.authorizations: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.serve(self)

            def do_POST(self) -> None:
                server.serve(self)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._http.server_address[1]}"

    def serve(self, request: BaseHTTPRequestHandler) -> None:
        authorization = request.headers.get("Authorization")
        self.authorizations.append(authorization)
        if authorization != self.expected:
            request.send_response(401)
            request.send_header("WWW-Authenticate", 'Basic realm="git"')
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        path, _, query = request.path.partition("?")
        environment = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": request.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": request.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
        }
        result = subprocess.run(
            ["git", "http-backend"], input=body, env=environment, capture_output=True, check=False
        )
        separator = b"\r\n\r\n" if b"\r\n\r\n" in result.stdout else b"\n\n"
        head, _, payload = result.stdout.partition(separator)
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        request.send_response(status)
        for name, value in headers:
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def __enter__(self) -> GitServer:
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()


def private_repository(root: Path) -> None:
    """`owner/private.git` under `root`, with a README only its readers may see."""
    work = root / "work"
    work.mkdir(parents=True)

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)

    git("init", "-b", "main")
    (work / "README.md").write_text("private content\n")
    git("add", ".")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-m", "private")
    git("clone", "--bare", str(work), str(root / "owner" / "private.git"), cwd=root)


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    root = tmp_path_factory.mktemp("git-server")
    private_repository(root)
    with GitServer(root, "x-access-token", TOKEN) as server:
        yield server


@pytest.fixture(scope="module", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """The clone is on the runner's host on both backends; the sandbox differs."""
    with running_stack(
        tmp_path_factory.mktemp("private-clone"),
        SCRIPT,
        TASKBUS_BACKEND=request.param,
        TASKBUS_API_KEYS=f"{OTHER_KEY}=nobody",
    ) as running:
        yield running


async def run_to_the_end(api: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str]:
    """(conversation id, final status) of a conversation created with `body`."""
    created = await api.post("/api/conversations", json=body)
    assert created.status_code == 201, created.text
    cid = created.json()["conversation_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = (await api.get(f"/api/conversations/{cid}")).json()["taskbus_status"]
        if status in ENDED_STATUSES:
            return cid, status
        await asyncio.sleep(0.5)
    raise AssertionError(f"conversation {cid} did not end")


async def logged_events(stack: Stack, cid: str) -> list[bytes]:
    """Every event of the conversation as the log stores it (read as the operator)."""
    nc = await connect(stack.nats_url, "git-credentials-test", stack.bus_credential(bus_auth.ADMIN))
    try:
        log = subjects.conversation_events(cid)
        messages, left = await read_batch(nc.jetstream(), log, 1, 1000)
        assert left == 0
        return [data for _, data in messages]
    finally:
        await nc.drain()


def files_holding(directory: Path, needle: bytes) -> list[Path]:
    return [
        path
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]


async def test_a_private_repository_clones_with_the_users_token_and_leaks_it_nowhere(
    stack: Stack, git_server: GitServer
) -> None:
    answers: list[httpx.Response] = []
    async with stack.client() as api:
        stored = await api.post(
            "/api/add-git-providers",
            json={
                "provider_tokens": {"github": {"token": TOKEN, "host": f"http://{git_server.host}"}}
            },
        )
        secret = await api.post(
            "/api/secrets", json={"name": "SANDBOX_SECRET", "value": SANDBOX_VALUE}
        )
        answers += [stored, secret]
        assert stored.status_code == 200, stored.text
        assert secret.status_code == 201, secret.text
        cid, status = await run_to_the_end(
            api,
            {
                "initial_user_msg": "Read the README.",
                "repository": "owner/private",
                "git_provider": "github",
            },
        )
        events = (await api.get(f"/api/conversations/{cid}/events?limit=100")).text
        answers += [await api.get("/api/secrets"), await api.get("/api/settings")]
    assert status == "FINISHED", events
    assert git_server.authorizations[-1] == git_server.expected  # GitHub's user name + token
    # The clone is the private one, its remote the resolved URL with no credential.
    assert "private content" in events
    assert f"http://{git_server.host}/owner/private.git" in events
    assert "credential" not in events and "x-access-token" not in events  # no helper kept
    # The sandbox has the sandbox secret (masked in the log) and nothing of the token.
    log = await logged_events(stack, cid)
    outputs = [data.decode() for data in log if b'"CmdOutputObservation"' in data]
    env_output = next(text for text in outputs if "---" in text)
    assert env_output.count(f"SANDBOX_SECRET={MASK}") == 2  # `env`, and the shell's environ
    assert env_output.count(MASK) == 2  # nothing else masked: the token is not there
    assert "TASKBUS_GIT" not in env_output and "TASKBUS_SANDBOX_SECRETS" not in env_output
    assert any(f"secret is {MASK}" in text for text in outputs)
    for needle in (TOKEN, SANDBOX_VALUE):
        assert not [data for data in log if needle.encode() in data], needle
        assert not [a for a in answers if needle in a.text], needle
        # Logs, the NATS store (log and buckets), the workspace with its .git, homes: nowhere.
        assert files_holding(stack.data_dir, needle.encode()) == [], needle
    git_config = (stack.data_dir / "workspaces" / cid / ".git" / "config").read_text()
    assert "helper" not in git_config and "@" not in git_config


async def test_without_the_token_the_clone_fails_saying_authentication_was_refused(
    stack: Stack, git_server: GitServer
) -> None:
    wrong = "ghp_" + uuid.uuid4().hex
    async with stack.client(OTHER_KEY) as nobody:  # a user without the token
        no_token = await run_to_the_end(
            nobody,
            {
                "initial_user_msg": "Read the README.",
                "repository": f"http://{git_server.host}/owner/private.git",
                "git_provider": "github",
            },
        )
        stored = await nobody.post(
            "/api/add-git-providers",
            json={
                "provider_tokens": {"github": {"token": wrong, "host": f"http://{git_server.host}"}}
            },
        )
        assert stored.status_code == 200, stored.text
        wrong_token = await run_to_the_end(
            nobody,
            {
                "initial_user_msg": "Read the README.",
                "repository": "owner/private",
                "git_provider": "github",
            },
        )
        errors = []
        for cid, status in (no_token, wrong_token):
            assert status == "ERROR"
            events = (await nobody.get(f"/api/conversations/{cid}/events?limit=100")).json()
            errors.append(next(e for e in events["events"] if e["kind"] == "ErrorObservation"))
            assert TOKEN not in str(events) and wrong not in str(events)
    for error in errors:
        assert "clone_failed" in str(error)
        assert "authentication was refused" in error["content"]
    assert "add-git-providers" in errors[0]["content"]  # says what to do
    assert f"token offered to {git_server.host} was not accepted" in errors[1]["content"]
