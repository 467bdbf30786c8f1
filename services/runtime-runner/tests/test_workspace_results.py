"""Results retrieval on every backend: `run_once`, listings, reads, zips, git changes and diffs
of a cloned repository, while the sandbox runs and after it is given back, and the attacks: a
path out of the workspace, a link to /etc/passwd, a FIFO, a huge file, and a repository whose
.git/config names commands for git to run on the host."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from taskbus.contracts.workspace import (
    MAX_READ_BYTES,
    FileDiff,
    GitChange,
    UploadChunk,
    WorkspaceErrorCode,
)
from taskbus.runtime_runner.results import (
    WorkspaceFailure,
    ZipStreams,
    git_changes,
    git_diff,
    list_files,
    parse_changes,
    read_file,
    text_content_type,
    upload,
    zip_chunks,
)
from taskbus.runtime_runner.sandbox import ActionError, CommandRequest, OneShotResult, Sandbox
from taskbus.runtime_runner.workspace import HostWorkspace, HostWorkspaceSandbox

from .conftest import SandboxMaker

README = "# App\n\nThe original.\n"


def _git(repository: Path, *arguments: str) -> None:
    subprocess.run(
        ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A repository with a README, a file the task deletes and one in a directory."""
    repository = tmp_path / "origin"
    (repository / "src").mkdir(parents=True)
    (repository / "README.md").write_text(README)
    (repository / "old.txt").write_text("to be deleted\n")
    (repository / "src" / "app.py").write_text("print('app')\n")
    _git(repository, "init", "-q", "-b", "main")
    _git(repository, "add", "-A")
    _git(repository, "commit", "-qm", "initial")
    return repository


async def _run(sandbox: Sandbox, command: str) -> str:
    async def ignore(_: str) -> None:
        pass

    outcome = await sandbox.run_command(CommandRequest(command=command, blocking=True), ignore)
    assert outcome.exit_code == 0, outcome.content
    return outcome.content


def _host(sandbox: Sandbox) -> HostWorkspaceSandbox:
    assert isinstance(sandbox, HostWorkspaceSandbox)
    return sandbox


# --- run_once ---------------------------------------------------------------------------------


async def test_run_once_keeps_stdout_and_the_exit_code_live_and_given_back(
    make_sandbox: SandboxMaker,
) -> None:
    sandbox = await make_sandbox()
    await _run(sandbox, "echo hi > left.txt")
    script = ["bash", "-c", "cat left.txt; echo noise >&2; exit 3"]
    live = await sandbox.run_once(script, seconds=30, max_output_bytes=100)
    assert live == OneShotResult(exit_code=3, output=b"hi\n")
    await sandbox.close()
    given_back = await sandbox.run_once(script, seconds=30, max_output_bytes=100)
    assert given_back == live


async def test_run_once_is_cut_at_its_cap_and_its_time_and_has_no_network(
    sandbox: Sandbox,
) -> None:
    flood = await sandbox.run_once(["bash", "-c", "yes"], seconds=30, max_output_bytes=1000)
    assert flood.truncated and flood.output == b"y\n" * 500
    started = time.monotonic()
    slow = await sandbox.run_once(["sleep", "60"], seconds=2, max_output_bytes=100)
    assert slow.exit_code != 0 and time.monotonic() - started < 20
    interfaces = await sandbox.run_once(
        ["cat", "/proc/net/dev"], seconds=30, max_output_bytes=10_000
    )
    names = {line.split(":")[0].strip() for line in interfaces.output.decode().splitlines()[2:]}
    assert names == {"lo"}


# --- git against the clone --------------------------------------------------------------------


async def _edit_like_the_agent(sandbox: Sandbox) -> None:
    await _run(
        sandbox,
        "echo 'Now says hello.' >> README.md && rm old.txt && printf 'print(1)\\n' > new.py"
        " && mkdir -p docs && echo guide > docs/guide.md",
    )


EXPECTED_CHANGES = [
    GitChange(status="M", path="README.md"),
    GitChange(status="A", path="docs/guide.md"),
    GitChange(status="A", path="new.py"),
    GitChange(status="D", path="old.txt"),
]


async def test_changes_and_diffs_are_against_the_clone_live_and_given_back(
    make_sandbox: SandboxMaker, origin: Path
) -> None:
    sandbox = _host(await make_sandbox(repository=str(origin)))
    await _edit_like_the_agent(sandbox)
    # A commit the agent makes does not hide its changes: they are against the clone.
    await _run(sandbox, "git add README.md && git -c user.name=a -c user.email=a@a commit -qm x")
    for moment in ("live", "given back"):
        assert (await git_changes(sandbox)).changes == EXPECTED_CHANGES, moment
        readme = await git_diff(sandbox, "README.md")
        assert readme == FileDiff(
            original=README.encode(), modified=(README + "Now says hello.\n").encode()
        )
        assert await git_diff(sandbox, "old.txt") == FileDiff(
            original=b"to be deleted\n", modified=b""
        )
        assert await git_diff(sandbox, "new.py") == FileDiff(original=b"", modified=b"print(1)\n")
        await sandbox.close()


async def test_a_workspace_without_a_repository_has_no_changes_to_show(
    sandbox: Sandbox,
) -> None:
    with pytest.raises(WorkspaceFailure) as refused:
        await git_changes(_host(sandbox))
    assert refused.value.reply.code == WorkspaceErrorCode.NOT_A_REPOSITORY
    # The agent's own repository (no clone recorded): against the empty tree.
    await _run(sandbox, "git init -q && echo a > a.txt")
    assert (await git_changes(_host(sandbox))).changes == [GitChange(status="A", path="a.txt")]


async def test_git_never_runs_the_repositorys_commands_on_the_host(
    make_sandbox: SandboxMaker, origin: Path, tmp_path: Path
) -> None:
    sandbox = _host(await make_sandbox(repository=str(origin)))
    marker = tmp_path / "pwned"  # a host path, outside every sandbox's view
    hook = f"touch {marker}"
    # What an agent (or the repository's own scripts) can write into the clone's config.
    await _run(
        sandbox,
        f"git config core.fsmonitor '{hook}' && git config diff.external '{hook}'"
        f" && git config filter.trap.clean '{hook}' && echo '* filter=trap' > .gitattributes"
        " && echo changed >> README.md",
    )
    workspace = sandbox.files.host_root
    # The trap is real: git run by the runner on the host would spring it.
    status = ["git", "-c", "safe.directory=*", "-C", str(workspace), "status"]
    await asyncio.to_thread(subprocess.run, status, capture_output=True)
    assert marker.exists()
    marker.unlink()
    for _ in ("live", "given back"):
        changes = (await git_changes(sandbox)).changes
        assert GitChange(status="M", path="README.md") in changes
        assert (await git_diff(sandbox, "README.md")).original == README.encode()
        await sandbox.close()
    assert not marker.exists()


# --- files ------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> HostWorkspace:
    root = tmp_path / "ws"
    (root / "src" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "src" / "app.py").write_text("print('app')\n")
    (root / "src" / "deep" / "data.bin").write_bytes(os.urandom(1024 * 1024))  # no compression
    (root / ".env.example").write_text("A=1\n")
    (root / "README.md").write_text(README)
    os.symlink("/etc/passwd", root / "passwd")
    os.symlink("/etc", root / "etc")
    os.mkfifo(root / "pipe")
    return HostWorkspace(root, str(root))


async def test_listing_is_one_level_dirs_first_hidden_included_git_and_links_not_followed(
    workspace: HostWorkspace,
) -> None:
    top = (await list_files(workspace, "")).paths
    assert top == ["src/", ".env.example", "README.md", "etc", "passwd", "pipe"]
    assert (await list_files(workspace, "src")).paths == ["src/deep/", "src/app.py"]
    for outside in ("..", "/etc", "../../", "etc", "src/../../x"):
        with pytest.raises(ActionError):
            await list_files(workspace, outside)


async def test_reading_gives_text_with_its_type_and_refuses_the_rest(
    workspace: HostWorkspace,
) -> None:
    content = await read_file(workspace, "src/app.py")
    assert content.content == b"print('app')\n"
    assert content.content_type == "text/x-python; charset=utf-8"
    assert (await read_file(workspace, "README.md")).content_type.endswith("charset=utf-8")
    refusals = {
        "src/deep/data.bin": "file_too_large",  # over MAX_READ_BYTES
        "passwd": "path_outside_workspace",  # /etc/passwd, through a link
        "etc/hostname": "path_outside_workspace",
        "../../etc/passwd": "path_outside_workspace",
        "/etc/passwd": "path_outside_workspace",
        "src": "is_a_directory",
        "pipe": "not_a_regular_file",  # opened without blocking, then refused
        "missing.txt": "file_not_found",
    }
    for path, code in refusals.items():
        with pytest.raises(ActionError) as refused:
            await asyncio.wait_for(read_file(workspace, path), 10)
        assert refused.value.code == code, path
    (workspace.host_root / "small.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    with pytest.raises(WorkspaceFailure) as binary:
        await read_file(workspace, "small.bin")
    assert binary.value.reply.code == WorkspaceErrorCode.BINARY
    assert MAX_READ_BYTES < 1024 * 1024


def test_text_is_utf8_without_nul() -> None:
    assert text_content_type("a.json", b'{"a": 1}') == ("application/json; charset=utf-8", True)
    assert text_content_type("noext", "héllo".encode()) == ("text/plain; charset=utf-8", True)
    assert text_content_type("a.txt", b"a\0b")[1] is False
    assert text_content_type("a.png", b"\xff\xd8")[0] == "image/png"


def _unzip(data: bytes) -> dict[str, tuple[int, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            info.filename: (info.external_attr >> 16, archive.read(info))
            for info in archive.infolist()
        }


async def test_the_zip_holds_the_workspace_links_as_links_and_no_git(
    workspace: HostWorkspace,
) -> None:
    chunks = list(zip_chunks(workspace, chunk_bytes=64 * 1024))
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 3  # the ~1 MB file is streamed, not held whole
    assert all(len(data) < 2 * 64 * 1024 + 1024 for data, _ in chunks)
    members = _unzip(b"".join(data for data, _ in chunks))
    assert set(members) == {
        "src/",
        "src/app.py",
        "src/deep/",
        "src/deep/data.bin",
        ".env.example",
        "README.md",
        "passwd",
        "etc",
    }
    mode, target = members["passwd"]
    assert stat.S_ISLNK(mode) and target == b"/etc/passwd"  # never the file's content
    assert (
        members["src/deep/data.bin"][1] == (workspace.host_root / "src/deep/data.bin").read_bytes()
    )
    assert members["README.md"][1] == README.encode()


async def test_zip_streams_are_owned_pulled_to_the_end_and_expire(
    workspace: HostWorkspace,
) -> None:
    streams = ZipStreams(idle_seconds=0.2, max_streams=2)
    owner = ("u1", "c1")
    first = streams.open(owner, workspace)
    with pytest.raises(WorkspaceFailure) as foreign:
        await streams.next(("u2", "c1"), first)
    assert foreign.value.reply.code == WorkspaceErrorCode.STREAM_EXPIRED
    data = b""
    while not (chunk := await streams.next(owner, first)).last:
        data += chunk.data
    assert "README.md" in _unzip(data + chunk.data)
    assert len(streams) == 0
    abandoned = streams.open(owner, workspace)
    streams.open(owner, workspace)
    with pytest.raises(WorkspaceFailure) as busy:
        streams.open(owner, workspace)
    assert busy.value.reply.code == WorkspaceErrorCode.BUSY
    await asyncio.sleep(0.3)
    streams.expire()
    assert len(streams) == 0
    with pytest.raises(WorkspaceFailure):
        await streams.next(owner, abandoned)


async def test_uploads_write_in_chunks_and_never_out_of_the_workspace(
    workspace: HostWorkspace,
) -> None:
    def chunk(path: str, offset: int, data: bytes) -> UploadChunk:
        return UploadChunk(user_id="u", conversation_id="c", path=path, offset=offset, data=data)

    assert (await upload(workspace, chunk("new/dir/a.txt", 0, b"abc"))).size == 3
    written = await upload(workspace, chunk("new/dir/a.txt", 3, b"def"))
    assert (written.path, written.size) == ("new/dir/a.txt", 6)
    assert (workspace.host_root / "new" / "dir" / "a.txt").read_bytes() == b"abcdef"
    for outside in ("../evil.txt", "/tmp/evil.txt", "etc/evil", "passwd"):
        with pytest.raises(ActionError):
            await upload(workspace, chunk(outside, 0, b"x"))
    assert await asyncio.to_thread(Path("/etc/passwd").read_bytes) != b"x"
    assert not (workspace.host_root.parent / "evil.txt").exists()


def test_changes_parse_from_git_z_output() -> None:
    output = b"M\0README.md\0D\0old\0T\0link\0\0new file\0dir/x\0"
    assert parse_changes(output) == [
        GitChange(status="M", path="README.md"),
        GitChange(status="A", path="dir/x"),
        GitChange(status="M", path="link"),
        GitChange(status="A", path="new file"),
        GitChange(status="D", path="old"),
    ]
    assert parse_changes(b"\0") == []
    assert parse_changes(b"\0a\0") == [GitChange(status="A", path="a")]
