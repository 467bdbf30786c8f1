"""Results retrieval through the whole stack, on the local (bubblewrap) and docker backends.

The scripted agent edits a cloned repository (a local repository cloned by path): it changes the
README, deletes a file, adds files and a directory, plants a link to /etc/passwd and a file
larger than select-file's cap. Then list-files, select-file, zip-directory (unzipped and
compared with the workspace on disk), git/changes and git/diff return what the workspace holds,
while the sandbox is live and again once it is given back (idle); upload-files writes files that
read back. Another user gets 404s, and after DELETE every endpoint is a 404 that recreates
nothing.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest

from taskbus.contracts.bus import connect
from taskbus.contracts.workspace import (
    FileList,
    ListFiles,
    UploadChunk,
    WorkspaceError,
    WorkspaceErrorCode,
    decode_reply,
    encode,
)
from taskbus.devtools import bus_auth

from .conftest import Stack, running_stack
from .public_api import next_event, open_events_ws

pytestmark = pytest.mark.slow

MALLORY_KEY = "tb_mallory_results_test_key"
IDLE_SECONDS = 40
README = "# App\n\nThe original.\n"
EDITS = (
    "echo 'Now says hello.' >> README.md && rm old.txt && mkdir -p docs"
    " && printf 'guide\\n' > docs/guide.md && ln -s /etc/passwd passwd-link"
    " && head -c 700000 /dev/urandom > big.bin"
)
SCRIPT = {
    "steps": [
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": EDITS}}]},
        {
            "tool_calls": [
                {
                    "name": "str_replace_editor",
                    "arguments": {
                        "command": "create",
                        "path": "hello.py",
                        "file_text": "print('hello')\n",
                    },
                }
            ]
        },
        {"tool_calls": [{"name": "finish", "arguments": {"message": "Edited the repository."}}]},
    ]
}
EXPECTED_CHANGES = [
    {"status": "M", "path": "README.md"},
    {"status": "A", "path": "big.bin"},
    {"status": "A", "path": "docs/guide.md"},
    {"status": "A", "path": "hello.py"},
    {"status": "D", "path": "old.txt"},
    {"status": "A", "path": "passwd-link"},
]
ENDPOINTS = [
    ("get", "list-files", {}),
    ("get", "select-file", {"file": "README.md"}),
    ("get", "zip-directory", {}),
    ("get", "git/changes", {}),
    ("get", "git/diff", {"path": "README.md"}),
]


@pytest.fixture(scope="module", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp(f"results-{request.param}"),
        SCRIPT,
        TASKBUS_BACKEND=request.param,
        TASKBUS_API_KEYS=f"{MALLORY_KEY}=mallory",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("origin") / "app"
    (repository / "src").mkdir(parents=True)
    (repository / "README.md").write_text(README)
    (repository / "old.txt").write_text("to be deleted\n")
    (repository / "src" / "app.py").write_text("print('app')\n")
    for arguments in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "initial"]):
        subprocess.run(
            ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
            check=True,
            capture_output=True,
        )
    return repository


def _workspace(stack: Stack, cid: str) -> Path:
    return stack.data_dir / "workspaces" / cid


def _on_disk(workspace: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry but .git: ("dir" | "link" | "file", link target or content)."""
    entries: dict[str, tuple[str, bytes]] = {}
    for current, directories, files in os.walk(workspace):
        directories[:] = [d for d in directories if d != ".git"]
        base = Path(current).relative_to(workspace)
        for name in directories:
            path = base / name
            if (workspace / path).is_symlink():
                entries[str(path)] = ("link", os.readlink(workspace / path).encode())
            else:
                entries[f"{path}/"] = ("dir", b"")
        for name in files:
            path = workspace / base / name
            relative = str(base / name)
            if path.is_symlink():
                entries[relative] = ("link", os.readlink(path).encode())
            else:
                entries[relative] = ("file", path.read_bytes())
    return entries


def _unzipped(data: bytes) -> dict[str, tuple[str, bytes]]:
    entries: dict[str, tuple[str, bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            kind = "link" if stat.S_ISLNK(mode) else "dir" if info.is_dir() else "file"
            entries[info.filename] = (kind, archive.read(info))
    return entries


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


async def _check_workspace(
    api: httpx.AsyncClient, stack: Stack, cid: str, uploaded: list[str]
) -> None:
    """Every read endpoint returns what the workspace on disk holds (`uploaded`: the files
    uploaded so far, new to git too)."""
    base = f"/api/conversations/{cid}"
    workspace = _workspace(stack, cid)
    disk = await asyncio.to_thread(_on_disk, workspace)

    listing = await api.get(f"{base}/list-files")
    assert listing.status_code == 200, listing.text
    top = {path for path in disk if path.count("/") == (1 if path.endswith("/") else 0)}
    assert sorted(listing.json()) == sorted(top)
    assert listing.json()[:2] == ["docs/", "src/"]  # directories first
    assert (await api.get(f"{base}/list-files", params={"path": "docs"})).json() == [
        "docs/guide.md"
    ]

    readme = await api.get(f"{base}/select-file", params={"file": "README.md"})
    assert readme.status_code == 200, readme.text
    assert readme.json() == {
        "code": disk["README.md"][1].decode(),
        "content_type": "text/markdown; charset=utf-8",
    }
    assert readme.json()["code"] == README + "Now says hello.\n"
    for outside in ("passwd-link", "../../../../etc/passwd", "/etc/passwd", "src/../../x"):
        leaked = await api.get(f"{base}/select-file", params={"file": outside})
        assert "root:" not in leaked.text
        _problem(leaked, 422)
    _problem(await api.get(f"{base}/select-file", params={"file": "big.bin"}), 413)
    _problem(await api.get(f"{base}/list-files", params={"path": "../"}), 422)

    async with api.stream("GET", f"{base}/zip-directory") as download:
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/zip"
        data = b"".join([chunk async for chunk in download.aiter_bytes()])
    unzipped = _unzipped(data)
    assert unzipped == disk
    assert unzipped["passwd-link"] == ("link", b"/etc/passwd")

    changes = await api.get(f"{base}/git/changes")
    assert changes.status_code == 200, changes.text
    added = [{"status": "A", "path": path} for path in uploaded]
    assert changes.json() == sorted(EXPECTED_CHANGES + added, key=lambda change: change["path"])
    diff = await api.get(f"{base}/git/diff", params={"path": "README.md"})
    assert diff.json() == {"original": README, "modified": README + "Now says hello.\n"}
    deleted = await api.get(f"{base}/git/diff", params={"path": "old.txt"})
    assert deleted.json() == {"original": "to be deleted\n", "modified": ""}


async def _check_upload(api: httpx.AsyncClient, cid: str, name: str) -> None:
    base = f"/api/conversations/{cid}"
    large = ("line of an uploaded file\n" * 12_000).encode()  # > one bus chunk
    uploaded = await api.post(
        f"{base}/upload-files",
        files=[
            ("files", (f"uploads/{name}", large, "text/plain")),
            ("files", ("../escaped.txt", b"x", "text/plain")),
        ],
    )
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert body["uploaded_files"] == [f"uploads/{name}"]
    assert [skipped["name"] for skipped in body["skipped_files"]] == ["../escaped.txt"]
    read = await api.get(f"{base}/select-file", params={"file": f"uploads/{name}"})
    assert read.json()["code"].encode() == large


async def _forged_requests_change_nothing(stack: Stack, cid: str) -> None:
    """On the bus, past the gateway's ownership check: a request naming another user is
    refused by the runner (it checks the runtime's owner), and no service but the gateway may
    send one at all."""
    planted = _workspace(stack, cid) / "forged.txt"
    gateway = await connect(stack.nats_url, "forger", stack.bus_credential(bus_auth.GATEWAY))
    try:
        for forged in (
            ListFiles(user_id="mallory", conversation_id=cid),
            UploadChunk(
                user_id="mallory", conversation_id=cid, path="forged.txt", offset=0, data=b"x"
            ),
        ):
            reply = await gateway.request(forged.subject, encode(forged), timeout=10)
            refused = decode_reply(reply.data, FileList)
            assert isinstance(refused, WorkspaceError), refused
            assert refused.code == WorkspaceErrorCode.NO_WORKSPACE
    finally:
        await gateway.drain()
    assert not planted.exists()
    manager = await connect(
        stack.nats_url, "forger", stack.bus_credential(bus_auth.SESSION_MANAGER)
    )
    try:
        forged = UploadChunk(
            user_id="local", conversation_id=cid, path="forged.txt", offset=0, data=b"x"
        )
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await manager.request(forged.subject, encode(forged), timeout=3)
    finally:
        await manager.drain()
    assert not planted.exists()


async def test_results_live_and_given_back(stack: Stack, origin: Path) -> None:
    async with stack.client() as api, stack.client(MALLORY_KEY) as mallory:
        created = await api.post(
            "/api/conversations",
            json={
                "initial_user_msg": "Edit the repository.",
                "repository": str(origin),
                "timeouts": {"idle_seconds": IDLE_SECONDS},
            },
        )
        assert created.status_code == 201, created.text
        cid = created.json()["conversation_id"]
        async with open_events_ws(stack, cid, -1) as ws:
            while (event := await next_event(ws))["kind"] != "AgentFinishAction":
                assert event["kind"] != "ErrorObservation", event
            finished = time.monotonic()

            await _check_workspace(api, stack, cid, [])
            await _check_upload(api, cid, "live.txt")
            # Still live: the idle timeout has not given the sandbox back yet.
            assert time.monotonic() - finished < IDLE_SECONDS - 5

            for method, path, params in ENDPOINTS:
                answer = await mallory.request(
                    method, f"/api/conversations/{cid}/{path}", params=params
                )
                _problem(answer, 404)
            await _forged_requests_change_nothing(stack, cid)

            while not (
                (event := await next_event(ws))["kind"] == "RuntimeStatusChanged"
                and event["status"] == "stopped"
            ):
                pass
        assert event["reason"] == "idle"

        await _check_workspace(api, stack, cid, ["uploads/live.txt"])
        await _check_upload(api, cid, "given-back.txt")

        deleted = await api.delete(f"/api/conversations/{cid}")
        assert deleted.status_code == 202, deleted.text
        for method, path, params in ENDPOINTS:
            _problem(
                await api.request(method, f"/api/conversations/{cid}/{path}", params=params), 404
            )
        refused = await api.post(
            f"/api/conversations/{cid}/upload-files", files=[("files", ("a.txt", b"a"))]
        )
        _problem(refused, 404)
        deadline = time.monotonic() + 30
        while _workspace(stack, cid).exists():  # the runner removes it as it handles the delete
            assert time.monotonic() < deadline, "the deleted workspace stayed"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        assert not _workspace(stack, cid).exists()  # and nothing recreated it
