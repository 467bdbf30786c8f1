"""Answers workspace requests (contracts/workspace.py: list, read, zip, git changes and diff,
upload) for the conversations whose workspace is on this host, while their sandbox runs and
after it is given back, until the conversation is deleted.

Files go through `HostWorkspace`, which refuses paths out of the workspace and never follows a
link out of it. Git runs through `Sandbox.run_once`, inside the conversation's confinement with
no network, never as the runner on the host: the repository is untrusted, and its .git/config
can name commands (core.fsmonitor, diff.external, filters) that git would run. Changes and
diffs are against the commit the workspace was cloned at, recorded on the host at clone time
(`workspace.base_commit_file`), or the empty tree when none was (no repository cloned).

Requests come through FastStream core subscribers on the runner's broker, in a queue group: on
one machine the one runner answers. Issue 11 (runners on many hosts) must route them to the
runner that holds the workspace. A zip stream already is: its chunks are pulled from a subject
only the runner that opened it listens on (no queue group). Each subject answers up to
`max_workers` requests at once, so a slow zip or git call does not hold up the others.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import secrets
import shlex
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from faststream.nats import NatsBroker
from faststream.nats.message import NatsMessage
from faststream.nats.subscriber.usecases.basic import LogicSubscriber

from taskbus.contracts import subjects
from taskbus.contracts.broker import itself, jetstream, reply_limit
from taskbus.contracts.events import RuntimeRequested
from taskbus.contracts.workspace import (
    CHUNK_BYTES,
    MAX_DIFF_BYTES,
    MAX_LISTING_BYTES,
    MAX_READ_BYTES,
    MAX_UPLOAD_BYTES,
    MAX_ZIP_STREAMS,
    REQUEST_TYPES,
    ZIP_IDLE_SECONDS,
    AnyWorkspaceRequest,
    ChunkWritten,
    FileContent,
    FileDiff,
    FileList,
    GitChange,
    GitChangeList,
    GitChanges,
    GitDiff,
    ListFiles,
    ReadFile,
    UploadChunk,
    WorkspaceError,
    WorkspaceErrorCode,
    WorkspaceReply,
    ZipChunk,
    ZipNext,
    ZipOpen,
    ZipOpened,
    decode_request,
    encode,
)
from taskbus.runtime_runner.replies import last_event
from taskbus.runtime_runner.sandbox import ActionError
from taskbus.runtime_runner.workspace import HostWorkspace, HostWorkspaceSandbox, base_commit_file

logger = logging.getLogger(__name__)

QUEUE_GROUP = "runtime_runner_workspace"
# Requests answered at once per subject.
MAX_WORKERS = 8
# Left out of listings and zips, as OpenHands leaves it out.
SKIPPED = frozenset({".git"})
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
GIT_SECONDS = 30.0
# Belt and braces (git runs confined anyway): no command the repository's config names.
GIT = [
    "git",
    "--no-pager",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.untrackedCache=false",
    "-c",
    "diff.external=",
    "-c",
    "safe.directory=*",
]
# Tracked changes against the base ("$1"), an empty field, then the untracked files; -z: any
# byte but NUL may be in a path.
_CHANGES_SCRIPT = (
    f"{shlex.join(GIT)} diff --name-status -z --no-renames --no-ext-diff --no-textconv "
    f'"$1" -- && printf "\\0" && {shlex.join(GIT)} ls-files --others --exclude-standard -z'
)
# OpenHands' letters; a type change (T) is a modification.
_STATUS = {"M": "M", "A": "A", "D": "D", "U": "U", "T": "M"}
_ERRORS = {
    "path_outside_workspace": WorkspaceErrorCode.OUTSIDE_WORKSPACE,
    "file_not_found": WorkspaceErrorCode.NOT_FOUND,
    "is_a_directory": WorkspaceErrorCode.IS_A_DIRECTORY,
    "not_a_directory": WorkspaceErrorCode.NOT_A_DIRECTORY,
    "file_too_large": WorkspaceErrorCode.TOO_LARGE,
}
_ZIP_DATE_FLOOR = (1980, 1, 1, 0, 0, 0)

SandboxBuilder = Callable[[RuntimeRequested], HostWorkspaceSandbox]


class WorkspaceFailure(Exception):
    def __init__(self, code: WorkspaceErrorCode, detail: str, content_type: str | None = None):
        super().__init__(detail)
        self.reply = WorkspaceError(code=code, detail=detail, content_type=content_type)


def failure_of(error: ActionError) -> WorkspaceFailure:
    return WorkspaceFailure(_ERRORS.get(error.code, WorkspaceErrorCode.INVALID), error.message)


# --- pure parts -------------------------------------------------------------------------------


def parse_changes(output: bytes) -> list[GitChange]:
    """`git diff --name-status -z` output, an empty field, `git ls-files -z` output, as
    OpenHands' changes (untracked files are added), sorted by path."""
    fields = output.split(b"\0")
    changes = []
    index = 0
    while index + 1 < len(fields) and fields[index]:
        status = fields[index].decode(errors="replace")
        path = fields[index + 1].decode(errors="replace")
        changes.append(GitChange(status=_STATUS.get(status[:1], "M"), path=path))
        index += 2
    for field in fields[index + 1 :]:
        if field:
            changes.append(GitChange(status="A", path=field.decode(errors="replace")))
    return sorted(changes, key=lambda change: change.path)


def readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by the OS as surrogates) become
    U+FFFD, as JSON and zip names must be valid UTF-8."""
    return name.encode(errors="surrogateescape").decode(errors="replace")


def text_content_type(path: str, data: bytes) -> tuple[str, bool]:
    """(content type, whether it is text): text is UTF-8 without NUL bytes."""
    guessed = mimetypes.guess_type(path, strict=False)[0]
    try:
        data.decode()
    except UnicodeDecodeError:
        return guessed or "application/octet-stream", False
    if b"\0" in data:
        return guessed or "application/octet-stream", False
    return f"{guessed or 'text/plain'}; charset=utf-8", True


class _Sink:
    """A write-only, unseekable stream zipfile writes into; its bytes are taken in chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def size(self) -> int:
        return len(self._buffer)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _date_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    moment = time.gmtime(mtime)[:6]
    return max(moment, _ZIP_DATE_FLOOR)


def zip_chunks(
    files: HostWorkspace, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[bytes, bool]]:
    """The workspace as a zip, produced as it is pulled: (chunk, last). Links are stored as
    links (their target, never what it points to); .git is left out; each file is read up to
    its size when reached, so a file the sandbox keeps growing cannot make the zip endless."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in files.walk(SKIPPED):
            name = readable(entry.path)
            info = zipfile.ZipInfo(name, date_time=_date_time(entry.info.st_mtime))
            mode = stat.S_IMODE(entry.info.st_mode)
            if entry.path.endswith("/"):
                info.external_attr = (stat.S_IFDIR | mode) << 16 | 0x10
                archive.writestr(info, b"")
            elif entry.file is None:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, entry.link.encode(errors="surrogateescape"))
            else:
                info.external_attr = (stat.S_IFREG | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = remaining = entry.info.st_size
                with archive.open(info, "w") as member:
                    while remaining > 0 and (data := entry.file.read(min(chunk_bytes, remaining))):
                        member.write(data)
                        remaining -= len(data)
                        if sink.size >= chunk_bytes:
                            yield sink.take(), False
            if sink.size >= chunk_bytes:
                yield sink.take(), False
    yield sink.take(), True


# --- zip streams ------------------------------------------------------------------------------


class _ZipStream:
    def __init__(self, owner: tuple[str, str], chunks: Iterator[tuple[bytes, bool]]) -> None:
        self.owner = owner
        self.chunks = chunks
        self.lock = asyncio.Lock()
        self.touched = time.monotonic()


class ZipStreams:
    """Open zip streams, each advanced one chunk per pull (off the event loop); a stream not
    pulled for `idle_seconds` is closed, which closes the file it was reading."""

    def __init__(
        self, idle_seconds: float = ZIP_IDLE_SECONDS, max_streams: int = MAX_ZIP_STREAMS
    ) -> None:
        self._idle_seconds = idle_seconds
        self._max_streams = max_streams
        self._streams: dict[str, _ZipStream] = {}

    def open(self, owner: tuple[str, str], files: HostWorkspace) -> str:
        self.expire()
        if len(self._streams) >= self._max_streams:
            raise WorkspaceFailure(WorkspaceErrorCode.BUSY, "too many zips in progress; retry")
        stream_id = secrets.token_hex(16)
        self._streams[stream_id] = _ZipStream(owner, zip_chunks(files))
        return stream_id

    async def next(self, owner: tuple[str, str], stream_id: str) -> ZipChunk:
        stream = self._streams.get(stream_id)
        if stream is None or stream.owner != owner:
            raise WorkspaceFailure(WorkspaceErrorCode.STREAM_EXPIRED, "no such zip stream")
        async with stream.lock:
            stream.touched = time.monotonic()
            try:
                data, last = await asyncio.to_thread(next, stream.chunks)
            except Exception:
                self._close(stream_id)
                raise
            stream.touched = time.monotonic()
        if last:
            self._close(stream_id)
        return ZipChunk(data=data, last=last)

    def expire(self) -> None:
        deadline = time.monotonic() - self._idle_seconds
        for stream_id, stream in list(self._streams.items()):
            if stream.touched < deadline and not stream.lock.locked():
                logger.info("zip stream %s abandoned; closed", stream_id)
                self._close(stream_id)

    def _close(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.chunks.close()  # type: ignore[attr-defined]

    def close_all(self) -> None:
        for stream_id in list(self._streams):
            self._close(stream_id)

    def __len__(self) -> int:
        return len(self._streams)


# --- the responder ----------------------------------------------------------------------------


class WorkspaceResponder:
    """Subscribes to the workspace subjects (queue group) and this runner's zip subject on
    `broker`, which starts them; `start` and `stop` look after the zip streams."""

    def __init__(
        self,
        broker: NatsBroker,
        new_sandbox: SandboxBuilder,
        zips: ZipStreams | None = None,
        max_workers: int = MAX_WORKERS,
    ) -> None:
        self._broker = broker
        self._new_sandbox = new_sandbox
        self._zips = zips or ZipStreams()
        self.next_subject = subjects.workspace_subject(f"zip_next.{secrets.token_hex(8)}")
        self._subscribers: list[LogicSubscriber[Any]] = [
            broker.subscriber(
                subjects.workspace_subject(request_type.operation),
                queue=QUEUE_GROUP,
                max_workers=max_workers,
            )
            for request_type in REQUEST_TYPES
            if request_type is not ZipNext
        ]
        # No queue group: only this runner holds the streams it opened.
        self._subscribers.append(broker.subscriber(self.next_subject, max_workers=max_workers))
        for subscriber in self._subscribers:
            subscriber(self._respond, decoder=itself)
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Close abandoned zip streams from now on (the broker answers the requests)."""
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Take no more requests, let those in hand finish, then close the zips."""
        await asyncio.gather(*(subscriber.stop() for subscriber in self._subscribers))
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._zips.close_all()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(ZIP_IDLE_SECONDS / 4)
            self._zips.expire()

    async def _respond(self, message: NatsMessage) -> bytes:
        """The encoded reply, which FastStream sends to the asker's inbox."""
        subject = message.raw_message.subject
        reply: WorkspaceReply
        try:
            request = decode_request(message.body)
            expected = self.next_subject if isinstance(request, ZipNext) else request.subject
            if subject != expected:
                raise WorkspaceFailure(WorkspaceErrorCode.INVALID, "request on the wrong subject")
            reply = await self.answer(request)
        except msgspec.MsgspecError as error:
            reply = WorkspaceError(code=WorkspaceErrorCode.INVALID, detail=str(error)[:500])
        except WorkspaceFailure as failure:
            reply = failure.reply
        except ActionError as error:
            reply = failure_of(error).reply
        except OSError as error:  # a name too long, a loop, a full disk: not the runner's fault
            reply = WorkspaceError(code=WorkspaceErrorCode.INVALID, detail=error.strerror or "")
        except Exception:
            logger.exception("workspace request on %s failed", subject)
            reply = WorkspaceError(code=WorkspaceErrorCode.INTERNAL, detail="internal error")
        data = encode(reply)
        if len(data) > reply_limit(self._broker):
            detail = "the answer is larger than one message on the bus"
            data = encode(WorkspaceError(code=WorkspaceErrorCode.TOO_LARGE, detail=detail))
        return data

    async def answer(self, request: AnyWorkspaceRequest) -> WorkspaceReply:
        if isinstance(request, ZipNext):
            owner = (request.user_id, request.conversation_id)
            return await self._zips.next(owner, request.stream_id)
        sandbox = await self._sandbox(request.user_id, request.conversation_id)
        return await answer(sandbox, request, self._zips, self.next_subject)

    async def _sandbox(self, user_id: str, conversation_id: str) -> HostWorkspaceSandbox:
        """A sandbox object for the conversation's latest runtime (whether or not it runs):
        only to reach its workspace and confinement; it is never started or closed."""
        requested = await last_event(jetstream(self._broker), conversation_id, RuntimeRequested)
        if not isinstance(requested, RuntimeRequested) or requested.user_id != user_id:
            raise WorkspaceFailure(
                WorkspaceErrorCode.NO_WORKSPACE, "the conversation has no workspace"
            )
        sandbox = self._new_sandbox(requested)
        if not await asyncio.to_thread(sandbox.files.host_root.is_dir):
            raise WorkspaceFailure(WorkspaceErrorCode.NO_WORKSPACE, "the workspace is gone")
        return sandbox


# --- the answers, transport-free --------------------------------------------------------------


async def answer(
    sandbox: HostWorkspaceSandbox,
    request: AnyWorkspaceRequest,
    zips: ZipStreams,
    next_subject: str,
) -> WorkspaceReply:
    """The answer to a request about `sandbox`'s workspace (a zip is pulled from `zips`)."""
    files = sandbox.files
    match request:
        case ListFiles():
            return await list_files(files, request.path)
        case ReadFile():
            return await read_file(files, request.path)
        case GitChanges():
            return await git_changes(sandbox)
        case GitDiff():
            return await git_diff(sandbox, request.path)
        case ZipOpen():
            stream_id = zips.open((request.user_id, request.conversation_id), files)
            return ZipOpened(stream_id=stream_id, next_subject=next_subject)
        case UploadChunk():
            return await upload(files, request)
    raise TypeError(f"unsupported request {type(request).__name__}")


async def list_files(files: HostWorkspace, path: str) -> FileList:
    relative = files.relative_path(path)
    entries = await asyncio.to_thread(files.entries, relative, SKIPPED)
    paths = [readable(f"{relative}/{entry}" if relative else entry) for entry in entries]
    if sum(len(entry.encode()) + 1 for entry in paths) > MAX_LISTING_BYTES:
        raise WorkspaceFailure(WorkspaceErrorCode.TOO_LARGE, f"{path} has too many entries")
    return FileList(paths=paths)


async def read_file(files: HostWorkspace, path: str) -> FileContent:
    data = await asyncio.to_thread(files.read_bytes, path, MAX_READ_BYTES)
    content_type, is_text = text_content_type(path, data)
    if not is_text:
        raise WorkspaceFailure(
            WorkspaceErrorCode.BINARY, f"{path} is not a text file", content_type
        )
    return FileContent(content=data, content_type=content_type)


def _base(files: HostWorkspace) -> str:
    """The commit the workspace was cloned at, or the empty tree."""
    host_root = files.host_root
    try:
        base = base_commit_file(host_root.parent, host_root.name).read_text().strip()
    except FileNotFoundError:
        return EMPTY_TREE
    return base or EMPTY_TREE


async def _require_repository(sandbox: HostWorkspaceSandbox) -> str:
    """The base to compare with; a workspace that is no git repository is refused."""
    if not await sandbox.is_dir(".git"):
        raise WorkspaceFailure(
            WorkspaceErrorCode.NOT_A_REPOSITORY, "the workspace is not a git repository"
        )
    return await asyncio.to_thread(_base, sandbox.files)


async def git_changes(sandbox: HostWorkspaceSandbox) -> GitChangeList:
    base = await _require_repository(sandbox)
    result = await sandbox.run_once(
        ["bash", "-c", _CHANGES_SCRIPT, "changes", base],
        seconds=GIT_SECONDS,
        max_output_bytes=MAX_LISTING_BYTES,
    )
    if result.truncated:
        raise WorkspaceFailure(WorkspaceErrorCode.TOO_LARGE, "too many changes to list")
    if result.exit_code != 0:
        raise WorkspaceFailure(
            WorkspaceErrorCode.GIT_FAILED, f"git failed (exit code {result.exit_code})"
        )
    return GitChangeList(changes=parse_changes(result.output))


async def git_diff(sandbox: HostWorkspaceSandbox, path: str) -> FileDiff:
    relative = sandbox.files.relative_path(path)
    if not relative:
        raise WorkspaceFailure(WorkspaceErrorCode.IS_A_DIRECTORY, "name a file")
    base = await _require_repository(sandbox)
    try:
        modified = await asyncio.to_thread(sandbox.files.read_bytes, relative, MAX_DIFF_BYTES)
    except ActionError as error:
        if error.code != "file_not_found":
            raise
        modified = b""  # deleted
    original = b""
    if base != EMPTY_TREE:
        result = await sandbox.run_once(
            [*GIT, "cat-file", "blob", f"{base}:{relative}"],
            seconds=GIT_SECONDS,
            max_output_bytes=MAX_DIFF_BYTES,
        )
        if result.truncated:
            raise WorkspaceFailure(
                WorkspaceErrorCode.TOO_LARGE, f"{path} was larger than {MAX_DIFF_BYTES} bytes"
            )
        if result.exit_code == 0:  # else not in the base commit: added
            original = result.output
    return FileDiff(original=original, modified=modified)


async def upload(files: HostWorkspace, chunk: UploadChunk) -> ChunkWritten:
    relative = files.relative_path(chunk.path)
    if not relative:
        raise WorkspaceFailure(WorkspaceErrorCode.INVALID, "name a file")
    size = chunk.offset + len(chunk.data)
    if size > MAX_UPLOAD_BYTES:
        raise WorkspaceFailure(
            WorkspaceErrorCode.TOO_LARGE, f"an upload is at most {MAX_UPLOAD_BYTES} bytes"
        )
    await asyncio.to_thread(files.write_bytes, relative, chunk.data, chunk.offset)
    return ChunkWritten(path=relative, size=size)
