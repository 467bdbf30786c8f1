"""Workspace requests and replies: they round-trip, refuse what a consumer must not act on, and
every reply at its caps fits one NATS message."""

from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.specs import NATS_DEFAULT_MAX_PAYLOAD
from taskbus.contracts.workspace import (
    CHUNK_BYTES,
    ERROR_STATUS,
    MAX_DIFF_BYTES,
    MAX_LISTING_BYTES,
    MAX_PATH_CHARS,
    MAX_READ_BYTES,
    FileContent,
    FileDiff,
    FileList,
    GitChanges,
    GitDiff,
    ListFiles,
    ReadFile,
    UploadChunk,
    WorkspaceError,
    WorkspaceErrorCode,
    WorkspaceRequest,
    ZipChunk,
    ZipNext,
    ZipOpen,
    decode_reply,
    decode_request,
    encode,
)

CID = "c0ffee"
REQUESTS: list[WorkspaceRequest] = [
    ListFiles(user_id="u", conversation_id=CID, path="src"),
    ReadFile(user_id="u", conversation_id=CID, path="a.txt"),
    GitChanges(user_id="u", conversation_id=CID),
    GitDiff(user_id="u", conversation_id=CID, path="a.txt"),
    ZipOpen(user_id="u", conversation_id=CID),
    ZipNext(user_id="u", conversation_id=CID, stream_id="0" * 32),
    UploadChunk(user_id="u", conversation_id=CID, path="a.bin", offset=3, data=b"\0\xff"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_round_trip_on_their_subject(request_: WorkspaceRequest) -> None:
    assert decode_request(encode(request_)) == request_
    assert request_.subject == subjects.workspace_subject(request_.operation)
    assert request_.subject.startswith(subjects.WORKSPACE_PREFIX + ".")


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "ListFiles", "user_id": "u", "conversation_id": "../etc"},
        {"type": "ListFiles", "user_id": "u", "conversation_id": CID, "extra": 1},
        {"type": "ReadFile", "user_id": "u", "conversation_id": CID, "path": "x" * 5000},
        {"type": "ReadFile", "user_id": "u", "conversation_id": CID, "path": "a\u0000b"},
        {"type": "ZipNext", "user_id": "u", "conversation_id": CID, "stream_id": "../../x"},
        {"type": "Nope", "user_id": "u", "conversation_id": CID},
    ],
)
def test_malformed_requests_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_request(msgspec.json.encode(payload))


def test_an_upload_chunk_is_at_most_one_chunk() -> None:
    oversized = UploadChunk(
        user_id="u", conversation_id=CID, path="a", offset=0, data=b"x" * (CHUNK_BYTES + 1)
    )
    with pytest.raises(msgspec.ValidationError):
        decode_request(encode(oversized))


def test_replies_decode_as_expected_or_as_the_error() -> None:
    listing = FileList(paths=["a/", "b"])
    assert decode_reply(encode(listing), FileList) == listing
    error = WorkspaceError(code=WorkspaceErrorCode.BINARY, detail="x", content_type="image/png")
    assert decode_reply(encode(error), FileList) == error
    with pytest.raises(msgspec.ValidationError):
        decode_reply(encode(listing), FileContent)


def test_every_error_has_a_status_and_only_the_runners_own_failure_is_a_5xx() -> None:
    assert set(ERROR_STATUS) == set(WorkspaceErrorCode)
    assert [code for code, status in ERROR_STATUS.items() if status >= 500] == [
        WorkspaceErrorCode.INTERNAL
    ]


def test_every_reply_and_request_at_its_caps_fits_one_message() -> None:
    worst_path = "\x01" * MAX_PATH_CHARS  # JSON's 6 bytes per character
    worst_bytes = b"\xff"
    largest = [
        FileContent(content=worst_bytes * MAX_READ_BYTES, content_type="t" * 200),
        FileDiff(original=worst_bytes * MAX_DIFF_BYTES, modified=worst_bytes * MAX_DIFF_BYTES),
        ZipChunk(data=worst_bytes * CHUNK_BYTES, last=False),
        # The runner refuses a listing whose paths pass MAX_LISTING_BYTES as read from disk.
        FileList(paths=["\x01" * 1000] * (MAX_LISTING_BYTES // 1000)),
        UploadChunk(
            user_id="u" * 200,
            conversation_id="c" * 64,
            path=worst_path,
            offset=0,
            data=worst_bytes * CHUNK_BYTES,
        ),
    ]
    for message in largest:
        size = len(encode(message))
        assert size <= NATS_DEFAULT_MAX_PAYLOAD - 4096, (type(message).__name__, size)
