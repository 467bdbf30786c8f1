"""Requests about a conversation's workspace files (OpenHands' list-files, select-file,
zip-directory, git/changes, git/diff and upload-files), answered by the runtime-runner that
holds the workspace over core NATS request-reply on `taskbus.workspace.<operation>`.

The gateway checks that the conversation is the caller's before it asks; the runner checks
again that the conversation's runtime was the user's. Every reply fits one NATS message: file
contents travel as bytes (base64 in JSON, a fixed 4/3, never JSON's 6x escape of a control
character) under caps sized for the default max_payload, and a zip travels as a pull stream of
chunks (`ZipOpen`, then `ZipNext` until `last`), so a slow client slows the runner and nothing
piles up in between. Paths are relative to the workspace, as OpenHands' client sends them.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from taskbus.contracts import subjects

# A path in the workspace, as the client names it (Linux' PATH_MAX).
MAX_PATH_CHARS = 4096
# Bytes of one file select-file answers (base64 in one reply); bigger is a 413.
MAX_READ_BYTES = 512 * 1024
# Bytes of each side of a git diff (original and modified travel in one reply).
MAX_DIFF_BYTES = 256 * 1024
# Bytes of a git changes listing and of a directory listing, as the runner collects them
# (JSON may write a control character in a name as 6 bytes).
MAX_LISTING_BYTES = 128 * 1024
# Bytes of one zip chunk and one upload chunk on the bus.
CHUNK_BYTES = 256 * 1024
# Most bytes and files one upload-files request may carry.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_FILES = 100
# A zip stream nobody pulled from for this long is closed (its client went away).
ZIP_IDLE_SECONDS = 60.0
# Most zip streams one runner keeps open at once.
MAX_ZIP_STREAMS = 16

# No NUL: no file name holds one (the OS refuses it).
WorkspacePath = Annotated[str, msgspec.Meta(max_length=MAX_PATH_CHARS, pattern=r"^[^\x00]*$")]
ConversationId = Annotated[str, msgspec.Meta(pattern=subjects.CONVERSATION_ID_PATTERN.pattern)]
StreamId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class WorkspaceRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag=True
):
    """Scoped to a user and one of their conversations."""

    operation: ClassVar[str]
    user_id: Annotated[str, msgspec.Meta(max_length=200)]
    conversation_id: ConversationId

    @property
    def subject(self) -> str:
        return subjects.workspace_subject(self.operation)


class ListFiles(WorkspaceRequest):
    """One directory level (OpenHands' list-files): directories end with `/`."""

    operation = "list_files"
    path: WorkspacePath = ""


class ReadFile(WorkspaceRequest):
    operation = "read_file"
    path: WorkspacePath


class GitChanges(WorkspaceRequest):
    operation = "git_changes"


class GitDiff(WorkspaceRequest):
    operation = "git_diff"
    path: WorkspacePath


class ZipOpen(WorkspaceRequest):
    operation = "zip_open"


class ZipNext(WorkspaceRequest):
    """Sent to the `next_subject` its `ZipOpened` named: the runner that holds the stream."""

    operation = "zip_next"
    stream_id: StreamId


class UploadChunk(WorkspaceRequest):
    """Bytes of one uploaded file at `offset`; offset 0 creates (or truncates) the file."""

    operation = "upload"
    path: WorkspacePath
    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_UPLOAD_BYTES)]
    data: Annotated[bytes, msgspec.Meta(max_length=CHUNK_BYTES)]


AnyWorkspaceRequest = ListFiles | ReadFile | GitChanges | GitDiff | ZipOpen | ZipNext | UploadChunk
REQUEST_TYPES: tuple[type[WorkspaceRequest], ...] = (
    ListFiles,
    ReadFile,
    GitChanges,
    GitDiff,
    ZipOpen,
    ZipNext,
    UploadChunk,
)


class WorkspaceReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Tagged, so a reader decodes `Expected | WorkspaceError` in one step."""


class FileList(WorkspaceReply):
    paths: list[str]


class FileContent(WorkspaceReply):
    content: bytes
    # e.g. `text/x-python; charset=utf-8`; the runner answers only text (binary is an error).
    content_type: str


class GitChange(msgspec.Struct, frozen=True, kw_only=True):
    # OpenHands' letters: M modified, A added (untracked too), D deleted, U unmerged.
    status: str
    path: str


class GitChangeList(WorkspaceReply):
    changes: list[GitChange]


class FileDiff(WorkspaceReply):
    """The file at the cloned commit (empty if it did not exist) and in the workspace now
    (empty if deleted)."""

    original: bytes
    modified: bytes


class ZipOpened(WorkspaceReply):
    stream_id: str
    next_subject: str


class ZipChunk(WorkspaceReply):
    data: bytes
    last: bool


class ChunkWritten(WorkspaceReply):
    path: str
    size: int


class WorkspaceErrorCode(enum.StrEnum):
    NO_WORKSPACE = "no_workspace"  # no sandbox started yet, or its workspace is gone
    NOT_FOUND = "not_found"
    OUTSIDE_WORKSPACE = "outside_workspace"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_A_DIRECTORY = "not_a_directory"
    TOO_LARGE = "too_large"
    BINARY = "binary"
    NOT_A_REPOSITORY = "not_a_repository"
    GIT_FAILED = "git_failed"
    STREAM_EXPIRED = "stream_expired"
    BUSY = "busy"
    INVALID = "invalid"
    INTERNAL = "internal"


# The HTTP status each error answers with (gateway) — never a 5xx for what a user or a
# sandbox can cause, but for the runner's own failure.
ERROR_STATUS: dict[WorkspaceErrorCode, int] = {
    WorkspaceErrorCode.NO_WORKSPACE: 409,  # the conversation exists (the gateway checked)
    WorkspaceErrorCode.NOT_FOUND: 404,
    WorkspaceErrorCode.OUTSIDE_WORKSPACE: 422,
    WorkspaceErrorCode.IS_A_DIRECTORY: 422,
    WorkspaceErrorCode.NOT_A_DIRECTORY: 422,
    WorkspaceErrorCode.TOO_LARGE: 413,
    WorkspaceErrorCode.BINARY: 415,
    # The conversation exists; its workspace is in no state for git (OpenHands says 404, which
    # reads as "no such conversation" right after a create).
    WorkspaceErrorCode.NOT_A_REPOSITORY: 409,
    WorkspaceErrorCode.GIT_FAILED: 409,
    WorkspaceErrorCode.STREAM_EXPIRED: 410,
    WorkspaceErrorCode.BUSY: 429,
    WorkspaceErrorCode.INVALID: 422,
    WorkspaceErrorCode.INTERNAL: 500,
}


class WorkspaceError(WorkspaceReply):
    code: WorkspaceErrorCode
    detail: str
    content_type: str | None = None  # of a binary file (415)


def encode(message: WorkspaceRequest | WorkspaceReply) -> bytes:
    return msgspec.json.encode(message)


_REQUEST_DECODER = msgspec.json.Decoder(AnyWorkspaceRequest)


def decode_request(data: bytes) -> AnyWorkspaceRequest:
    """Raises msgspec.DecodeError / ValidationError for anything but a well-formed request."""
    request: AnyWorkspaceRequest = _REQUEST_DECODER.decode(data)
    return request


R = TypeVar("R", bound=WorkspaceReply)
_REPLY_DECODERS: dict[type[WorkspaceReply], msgspec.json.Decoder[Any]] = {}


def decode_reply(data: bytes, expected: type[R]) -> R | WorkspaceError:
    """Raises msgspec.DecodeError for a reply of any other type."""
    decoder = _REPLY_DECODERS.get(expected)
    if decoder is None:
        decoder = _REPLY_DECODERS[expected] = msgspec.json.Decoder(expected | WorkspaceError)
    reply: R | WorkspaceError = decoder.decode(data)
    return reply
