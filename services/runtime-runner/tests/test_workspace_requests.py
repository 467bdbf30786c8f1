"""The workspace responder over a real bus: what a forged request on `taskbus.workspace.*` can do.

The responder takes each request's message itself (`broker.itself`), so it can check that the
request came on its own operation's subject: a request on another operation's subject (past
a rule that allows that one), or an undecodable one, is answered INVALID and reaches no
workspace."""

from __future__ import annotations

from pathlib import Path

import nats
from prometheus_client import CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.broker import jetstream, service_broker
from taskbus.contracts.events import RuntimeRequested
from taskbus.contracts.streams import ensure_streams
from taskbus.contracts.workspace import (
    FileList,
    ListFiles,
    UploadChunk,
    WorkspaceError,
    WorkspaceErrorCode,
    ZipNext,
    decode_reply,
    encode,
)
from taskbus.devtools.nats_server import NatsServer
from taskbus.runtime_runner.results import WorkspaceResponder
from taskbus.runtime_runner.workspace import HostWorkspaceSandbox

CID = "0123456789abcdef0123456789abcdef"


async def test_forged_workspace_requests_are_refused_and_reach_no_workspace(
    tmp_path: Path,
) -> None:
    built: list[RuntimeRequested] = []

    def no_sandbox(requested: RuntimeRequested) -> HostWorkspaceSandbox:
        built.append(requested)
        raise AssertionError("a forged request reached a workspace")

    with NatsServer(tmp_path / "nats") as server:
        broker = service_broker(server.url, "runtime-runner", registry=CollectorRegistry())
        responder = WorkspaceResponder(broker, no_sandbox)
        await broker.start()
        await ensure_streams(jetstream(broker))
        nc = await nats.connect(server.url)
        try:

            async def ask(subject: str, body: bytes) -> FileList | WorkspaceError:
                reply = await nc.request(subject, body, timeout=5)
                return decode_reply(reply.data, FileList)

            upload = UploadChunk(
                user_id="u", conversation_id=CID, path="evil.txt", offset=0, data=b"x"
            )
            zip_next = ZipNext(user_id="u", conversation_id=CID, stream_id="ab" * 16)
            list_files = subjects.workspace_subject(ListFiles.operation)
            forged = [
                (list_files, encode(upload)),  # an upload past a read-only rule
                (list_files, encode(zip_next)),  # another runner's zip stream
                (list_files, b"{not json"),
                (list_files, b'{"type": "ListFiles", "user_id": 7}'),
            ]
            for subject, body in forged:
                answer = await ask(subject, body)
                assert isinstance(answer, WorkspaceError), body
                assert answer.code == WorkspaceErrorCode.INVALID, (body, answer)
            # A request on its own subject passes the check (and finds no workspace here).
            honest = ListFiles(user_id="u", conversation_id=CID)
            answer = await ask(honest.subject, encode(honest))
            assert isinstance(answer, WorkspaceError)
            assert answer.code == WorkspaceErrorCode.NO_WORKSPACE
            assert built == []
        finally:
            await nc.close()
            await responder.stop()
            await broker.stop()
    assert not (tmp_path / "evil.txt").exists()
