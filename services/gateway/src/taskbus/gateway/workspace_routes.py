"""A conversation's workspace files, as OpenHands serves them: list-files, select-file,
zip-directory, git/changes, git/diff and upload-files. The runner that holds the workspace
answers (contracts/workspace.py), while the sandbox runs and after it is given back; the
conversation must be the caller's (404 otherwise, and once deleted)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message

from taskbus.contracts.workspace import (
    CHUNK_BYTES,
    ERROR_STATUS,
    MAX_PATH_CHARS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_FILES,
    ChunkWritten,
    FileContent,
    FileDiff,
    FileList,
    GitChangeList,
    GitChanges,
    GitDiff,
    ListFiles,
    ReadFile,
    UploadChunk,
    WorkspaceError,
    WorkspaceErrorCode,
    WorkspaceReply,
    WorkspaceRequest,
    ZipChunk,
    ZipNext,
    ZipOpen,
    ZipOpened,
    decode_reply,
    encode,
)
from taskbus.gateway.bus import Bus, too_large_for_the_bus, unavailable
from taskbus.gateway.dependencies import BusDep, UserId
from taskbus.gateway.problems import PROBLEM_MEDIA_TYPE, Problem, content_too_large
from taskbus.gateway.rest import json_response

router = APIRouter(prefix="/api/conversations/{conversation_id}", tags=["workspace"])

R = TypeVar("R", bound=WorkspaceReply)
# Git in a one-shot sandbox may take a while (a container to start, a big repository).
REPLY_SECONDS = 60.0
# Multipart framing around the uploaded bytes.
_MULTIPART_OVERHEAD = 1024 * 1024
WorkspacePath = Annotated[str, Query(max_length=MAX_PATH_CHARS)]


def _problems(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """Problem answers of an operation beyond those every operation of its shape declares."""
    schema = {"$ref": "#/components/schemas/ProblemDocument"}
    return {
        status: {"description": text, "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}
        for status, text in answers.items()
    }


_TOO_LARGE = "Larger than the answer may be (the problem says the limit)"
_NO_WORKSPACE = "The conversation has no workspace (its sandbox never started)"
_GIT_FAILED_OR_NONE = (
    "No workspace yet, the workspace is no git repository, or git failed on its repository"
)


class WorkspaceProblem(Exception):
    """A runner's error reply, for callers that report some errors per file."""

    def __init__(self, problem: Problem, code: WorkspaceErrorCode) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.code = code


async def ask(bus: Bus, request: WorkspaceRequest, expected: type[R], subject: str = "") -> R:
    """Request-reply to the runner; its error reply raises `WorkspaceProblem`."""
    try:
        message = await bus.nc.request(
            subject or request.subject, encode(request), timeout=REPLY_SECONDS
        )
    except nats.errors.MaxPayloadError as error:
        raise too_large_for_the_bus(error) from error
    except (nats.errors.Error, TimeoutError) as error:
        raise unavailable("the runtime-runner") from error
    try:
        reply = decode_reply(message.data, expected)
    except msgspec.DecodeError as error:
        raise Problem(502, "the runtime-runner answered with an unexpected reply") from error
    if not isinstance(reply, WorkspaceError):
        return reply
    status = ERROR_STATUS[reply.code]
    extensions: dict[str, Any] = {"code": reply.code}
    if reply.content_type is not None:
        extensions["content_type"] = reply.content_type
    problem = Problem(status, reply.detail, kind=reply.code.replace("_", "-"), **extensions)
    raise WorkspaceProblem(problem, reply.code)


async def _answer(bus: Bus, request: WorkspaceRequest, expected: type[R]) -> R:
    """The runner's answer once the conversation is known to be the caller's."""
    await bus.owned_conversation(request.user_id, request.conversation_id)
    try:
        return await ask(bus, request, expected)
    except WorkspaceProblem as failed:
        raise failed.problem from None


@router.get(
    "/list-files",
    summary="List a directory of the workspace",
    responses=_problems({409: _NO_WORKSPACE, 413: "The directory has too many entries to list"}),
)
async def list_files(
    conversation_id: str, user: UserId, bus: BusDep, path: WorkspacePath = ""
) -> Response:
    """One level, as OpenHands' list-files: paths relative to the workspace (prefixed with
    `path`), directories first and ending with `/`. Hidden files are listed, `.git` is not;
    a symbolic link is listed as itself, never followed."""
    request = ListFiles(user_id=user, conversation_id=conversation_id, path=path)
    return json_response((await _answer(bus, request, FileList)).paths)


@router.get(
    "/select-file",
    summary="Read one text file of the workspace",
    responses=_problems(
        {409: _NO_WORKSPACE, 413: _TOO_LARGE, 415: "Not a text file (`content_type` says what)"}
    ),
)
async def select_file(
    conversation_id: str, user: UserId, bus: BusDep, file: WorkspacePath
) -> Response:
    """OpenHands' `{code}` with Taskbus' `content_type`. At most 512 KiB (413 beyond); a file
    that is not UTF-8 text is a 415 naming its type. A link is followed only within the
    workspace."""
    request = ReadFile(user_id=user, conversation_id=conversation_id, path=file)
    content = await _answer(bus, request, FileContent)
    return json_response({"code": content.content.decode(), "content_type": content.content_type})


@router.get(
    "/zip-directory",
    summary="Download the workspace as a zip",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {"schema": {"type": "string"}}}},
        **_problems({409: _NO_WORKSPACE, 429: "Too many zips in progress on the runner; retry"}),
    },
)
async def zip_directory(conversation_id: str, user: UserId, bus: BusDep) -> StreamingResponse:
    """Streamed as the runner zips it, one chunk pulled at a time (a slow download slows the
    zipping; nothing piles up in between). `.git` is left out; symbolic links are stored as
    links. An error after the first bytes can only cut the download short."""
    opened = await _answer(bus, ZipOpen(user_id=user, conversation_id=conversation_id), ZipOpened)
    pull = ZipNext(user_id=user, conversation_id=conversation_id, stream_id=opened.stream_id)
    first = await _next_chunk(bus, pull, opened.next_subject)

    async def chunks() -> AsyncIterator[bytes]:
        chunk = first
        yield chunk.data
        while not chunk.last:
            chunk = await _next_chunk(bus, pull, opened.next_subject)
            yield chunk.data

    return StreamingResponse(
        chunks(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="workspace.zip"'},
    )


async def _next_chunk(bus: Bus, pull: ZipNext, subject: str) -> ZipChunk:
    try:
        return await ask(bus, pull, ZipChunk, subject)
    except WorkspaceProblem as failed:
        raise failed.problem from None


@router.get(
    "/git/changes",
    summary="Files changed since the clone",
    responses=_problems({409: _GIT_FAILED_OR_NONE, 413: "Too many changes to list"}),
)
async def git_changes(conversation_id: str, user: UserId, bus: BusDep) -> Response:
    """OpenHands' `[{status, path}]` against the commit the workspace was cloned at (the empty
    tree when no repository was cloned): M modified, A added (untracked too), D deleted,
    U unmerged. Git runs inside the conversation's confinement. 404 when the workspace is not
    a git repository."""
    request = GitChanges(user_id=user, conversation_id=conversation_id)
    changes = await _answer(bus, request, GitChangeList)
    return json_response(changes.changes)


@router.get(
    "/git/diff",
    summary="One file at the clone and now",
    responses=_problems({409: _GIT_FAILED_OR_NONE, 413: _TOO_LARGE}),
)
async def git_diff(
    conversation_id: str, user: UserId, bus: BusDep, path: WorkspacePath
) -> Response:
    """OpenHands' `{original, modified}`: the file at the cloned commit (empty when it was not
    there) and in the workspace (empty once deleted), as text; each at most 256 KiB."""
    request = GitDiff(user_id=user, conversation_id=conversation_id, path=path)
    diff = await _answer(bus, request, FileDiff)
    return json_response(
        {
            "original": diff.original.decode(errors="replace"),
            "modified": diff.modified.decode(errors="replace"),
        }
    )


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "The files; each is written at its file name, relative "
                        "to the workspace.",
                    }
                },
                "required": ["files"],
            }
        }
    },
}


@router.post(
    "/upload-files",
    summary="Upload files into the workspace",
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_files(
    conversation_id: str, request: Request, user: UserId, bus: BusDep
) -> Response:
    """Multipart `files`, as OpenHands' upload-files: each is written at its file name
    (relative to the workspace, parents created); OpenHands' answer `{uploaded_files,
    skipped_files}` names the written paths and why others were skipped (a path out of the
    workspace, a directory in the way). At most 100 files and 64 MiB in all (413 beyond)."""
    await bus.owned_conversation(user, conversation_id)
    declared = request.headers.get("content-length", "")
    limit = MAX_UPLOAD_BYTES + _MULTIPART_OVERHEAD
    if declared.isdigit() and int(declared) > limit:
        raise content_too_large(limit)
    try:
        form = await _capped(request, limit).form(max_files=MAX_UPLOAD_FILES, max_fields=10)
    except MultiPartException as error:
        raise Problem(400, str(error), kind="malformed-multipart") from None
    uploaded: list[str] = []
    skipped: list[dict[str, str]] = []
    try:
        if not form.getlist("files"):
            raise Problem(422, "multipart field `files` is required", kind="validation-error")
        for item in form.getlist("files"):
            if not isinstance(item, UploadFile):
                raise Problem(422, "`files` must be files", kind="validation-error")
            name = item.filename or ""
            if not name or len(name) > MAX_PATH_CHARS:
                skipped.append({"name": name[:200], "reason": "no file name, or one too long"})
                continue
            try:
                uploaded.append(await _upload(bus, user, conversation_id, name, item))
            except WorkspaceProblem as failed:
                if failed.code is WorkspaceErrorCode.NO_WORKSPACE:
                    raise failed.problem from None
                skipped.append({"name": name, "reason": failed.problem.detail})
    finally:
        await form.close()
    return json_response({"uploaded_files": uploaded, "skipped_files": skipped})


async def _upload(bus: Bus, user: str, conversation_id: str, name: str, file: UploadFile) -> str:
    """Send one file in chunks (the first creates it); its path relative to the workspace."""
    offset, path = 0, name
    while True:
        data = await file.read(CHUNK_BYTES)
        if offset and not data:
            return path
        chunk = UploadChunk(
            user_id=user, conversation_id=conversation_id, path=name, offset=offset, data=data
        )
        path = (await ask(bus, chunk, ChunkWritten)).path
        offset += len(data)
        if len(data) < CHUNK_BYTES:
            return path


def _capped(request: Request, max_bytes: int) -> Request:
    """The request, whose body reads raise a 413 past `max_bytes` (a chunked body declares no
    length to check first)."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > max_bytes:
            raise content_too_large(max_bytes)
        return message

    return Request(request.scope, receive)
