"""Reactions of the runtime-runner to events: sandboxes for RuntimeRequested, control requests,
and an observation for every executable action. Transport-free: events in, appends out."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender, is_unavailable
from taskbus.contracts.events import (
    CmdOutputChunk,
    CmdOutputObservation,
    CmdRunAction,
    ConversationDeleted,
    ErrorObservation,
    Event,
    EventSource,
    FileEditAction,
    FileReadAction,
    FileWriteAction,
    MCPAction,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeRequested,
    RuntimeStatusChanged,
)
from taskbus.contracts.redaction import redact
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.files import FileActions, reply_to
from taskbus.runtime_runner.journal import InFlightJournal
from taskbus.runtime_runner.mcp_clients import MCPClients
from taskbus.runtime_runner.replies import is_answered
from taskbus.runtime_runner.sandbox import ActionError, CommandRequest, Sandbox
from taskbus.runtime_runner.workspace import remove_conversation_directories

if TYPE_CHECKING:  # imported with the mcp SDK, by the first conversation that has servers
    from taskbus.runtime_runner.mcp_tools import ConversationMCP

logger = logging.getLogger(__name__)

SandboxFactory = Callable[[RuntimeRequested], Sandbox]


class SandboxCapacity(msgspec.Struct, frozen=True, kw_only=True):
    """The operator's bound on the sandboxes (on docker: containers) one runner holds at once,
    given-back ones not counted; a start beyond it waits `wait_seconds` for one to be given
    back, then fails with `runner_full`. None: no bound."""

    max_sandboxes: int | None = None
    wait_seconds: float = 30.0


class RecoveredSandbox:
    """A live runtime's sandbox taken over after a runner restart."""

    def __init__(self, sandbox: Sandbox, paused: bool, requested: RuntimeRequested) -> None:
        self.sandbox = sandbox
        self.paused = paused
        # The RuntimeRequested it serves: a stop request after it voids the sandbox.
        self.requested = requested


# Finds, by conversation id, the sandbox of a runtime the log says is live (None: there is none).
SandboxRecovery = Callable[[str], Awaitable[RecoveredSandbox | None]]


class _Runtime:
    def __init__(
        self, sandbox: Sandbox, files: FileActions, mcp: ConversationMCP | None = None
    ) -> None:
        self.sandbox = sandbox
        self.files = files
        self.paused = False
        self.mcp = mcp  # its MCP servers, if its conversation has any

    async def close(self, remove: bool = True) -> None:
        if self.mcp is not None:
            await self.mcp.close()
        await (self.sandbox.close() if remove else self.sandbox.detach())


class RuntimeRunner:
    """Owns this process' sandboxes, one per conversation.

    Callers run one conversation's RuntimeRequested and actions in log order, and its control
    requests in another ordered lane, so a stop is not stuck behind a long command.
    """

    def __init__(
        self,
        appender: EventAppender,
        new_sandbox: SandboxFactory,
        max_output_bytes: int,
        journal: InFlightJournal,
        workspace_root: Path,
        recover: SandboxRecovery | None = None,
        mcp: MCPClients | None = None,
        capacity: SandboxCapacity | None = None,
    ) -> None:
        self._appender = appender
        self._capacity = capacity or SandboxCapacity()
        # Sandboxes being started or removed: they count against the capacity as held ones do.
        self._in_transit = 0
        self._freed = asyncio.Condition()
        self._mcp = mcp
        self._workspace_root = workspace_root
        self._new_sandbox = new_sandbox
        self._max_output_bytes = max_output_bytes
        self._journal = journal
        self._recover = recover
        self._runtimes: dict[str, _Runtime] = {}
        # One recovery per conversation, shared by its work and control lanes.
        self._recoveries: dict[str, asyncio.Task[_Runtime | None]] = {}
        # conversation id -> id of its latest stop request: a start older than it is void.
        self._stopped_at: dict[str, int] = {}

    async def handle(self, event: Event) -> None:
        match event:
            case RuntimeRequested():
                await self._start(event)
            case RuntimeControlRequested():
                await self._control(event)
            case ConversationDeleted():
                await self._delete(event)
            case (
                CmdRunAction()
                | FileReadAction()
                | FileWriteAction()
                | FileEditAction()
                | MCPAction()
            ):
                await self._execute(event)

    def adopt(
        self, conversation_id: str, sandbox: Sandbox, paused: bool, requested: RuntimeRequested
    ) -> None:
        """Take over a sandbox that outlived the previous runner (see `reconcile`); its MCP
        servers start again on their first call."""
        runtime = self._new_runtime(requested, sandbox)
        runtime.paused = paused
        self._runtimes[conversation_id] = runtime

    def _new_runtime(self, requested: RuntimeRequested, sandbox: Sandbox) -> _Runtime:
        mcp = self._mcp.for_sandbox(requested, sandbox) if self._mcp is not None else None
        return _Runtime(sandbox, FileActions(sandbox, self._max_output_bytes), mcp)

    def room(self) -> float:
        """How many more sandboxes this runner may start now (inf: no bound)."""
        bound = self._capacity.max_sandboxes
        if bound is None:
            return math.inf
        return bound - len(self._runtimes) - self._in_transit

    async def _claim_room(self) -> bool:
        """Count a start against the capacity, waiting for a sandbox to be given back if it
        is full; False if none was within `wait_seconds`."""
        async with self._freed:
            try:
                async with asyncio.timeout(self._capacity.wait_seconds):
                    await self._freed.wait_for(lambda: self.room() > 0)
            except TimeoutError:
                return False
            self._in_transit += 1
            return True

    async def _release_room(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    def live_sandboxes(self) -> dict[str, Sandbox]:
        """The ready, unpaused sandboxes by conversation: what `UsageSampler` measures."""
        return {cid: rt.sandbox for cid, rt in self._runtimes.items() if not rt.paused}

    async def _runtime(self, conversation_id: str) -> _Runtime | None:
        """The conversation's sandbox; on its first event after a restart, the one the log says
        it has (ready or paused), taken over through `recover` (the local backend's way)."""
        runtime = self._runtimes.get(conversation_id)
        if runtime is not None or self._recover is None:
            return runtime
        recovery = self._recoveries.get(conversation_id)
        if recovery is None:
            recovery = asyncio.create_task(self._recover_runtime(self._recover, conversation_id))
            self._recoveries[conversation_id] = recovery
            recovery.add_done_callback(lambda _: self._recoveries.pop(conversation_id, None))
        return await asyncio.shield(recovery)

    async def _recover_runtime(
        self, recover: SandboxRecovery, conversation_id: str
    ) -> _Runtime | None:
        recovered = await recover(conversation_id)
        if recovered is None:
            return None
        if self._stopped_at.get(conversation_id, -1) > recovered.requested.id:
            await recovered.sandbox.close()  # stopped meanwhile; "stopped" is in the log
            return None
        if conversation_id not in self._runtimes:  # else started anew meanwhile; drop this one
            self.adopt(conversation_id, recovered.sandbox, recovered.paused, recovered.requested)
        return self._runtimes[conversation_id]

    async def close(self, remove_sandboxes: bool = False) -> None:
        """Let go of the sandboxes as the runner shuts down: detached (docker ones stay for the
        next runner to re-attach) or removed. All at once: one after another, dozens of
        removals outlast the grace a supervisor gives a stopping runner."""
        await asyncio.gather(*(r.close(remove_sandboxes) for r in self._runtimes.values()))
        self._runtimes.clear()

    def _status(
        self, cause: Event, status: RuntimeStatus, reason: str = ""
    ) -> RuntimeStatusChanged:
        """A status reply; "ready" and "paused" say where the sandbox is."""
        runtime = self._runtimes.get(cause.conversation_id)
        if runtime is None or status not in (RuntimeStatus.READY, RuntimeStatus.PAUSED):
            return RuntimeStatusChanged(**reply_to(cause), status=status, reason=reason)
        sandbox = runtime.sandbox
        return RuntimeStatusChanged(
            **reply_to(cause),
            status=status,
            reason=reason,
            backend=sandbox.backend,
            sandbox_id=sandbox.sandbox_id,
            workspace=sandbox.workspace,
        )

    async def _start(self, request: RuntimeRequested) -> None:
        cid = request.conversation_id
        await self._appender.append(self._status(request, RuntimeStatus.STARTING))
        if cid not in self._runtimes:
            if not await self._claim_room():
                await self._refuse_start(request, "runner_full", self._full_message())
                return
            try:
                sandbox = await self._start_sandbox(request)
                if sandbox is not None:  # held from here on, without a moment uncounted
                    self._runtimes[cid] = self._new_runtime(request, sandbox)
            finally:
                self._in_transit -= 1
                if cid not in self._runtimes:
                    await self._release_room()
            runtime = self._runtimes.get(cid)
            if runtime is None:
                return
            if runtime.mcp is not None:
                # Before READY, so the agent's first LLM call already offers the tools.
                listed = await runtime.mcp.start(request)
                if self._runtimes.get(cid) is not runtime:
                    return  # stopped while its MCP servers started; "stopped" is in the log
                await self._appender.append_all(listed)
        await self._appender.append(self._status(request, RuntimeStatus.READY))

    async def _start_sandbox(self, request: RuntimeRequested) -> Sandbox | None:
        """A started sandbox for `request`; None if it failed (the error is in the log) or a
        stop came meanwhile ("stopped" is in the log)."""
        sandbox = self._new_sandbox(request)
        try:
            await sandbox.start(request.repository, request.selected_branch)
        except Exception as error:
            await sandbox.close()
            code = error.code if isinstance(error, ActionError) else "runtime_start_failed"
            message = redact(str(error))
            logger.warning("sandbox for %s failed to start: %s", request.conversation_id, message)
            await self._refuse_start(request, code, message)
            return None
        if self._stopped_at.get(request.conversation_id, -1) > request.id:
            await sandbox.close()
            return None
        return sandbox

    async def _refuse_start(self, request: RuntimeRequested, code: str, message: str) -> None:
        await self._appender.append_all(
            [
                ErrorObservation(**reply_to(request), code=code, content=message),
                self._status(request, RuntimeStatus.ERROR, f"{code}: {message}"),
            ]
        )

    def _full_message(self) -> str:
        capacity = self._capacity
        return (
            f"This runner holds its maximum of {capacity.max_sandboxes} sandboxes and none was "
            f"given back within {capacity.wait_seconds:g} s; try again later."
        )

    async def _control(self, request: RuntimeControlRequested) -> None:
        cid = request.conversation_id
        if request.action == RuntimeControl.STOP:
            await self._remove_sandbox(request)
            await self._appender.append(
                self._status(request, RuntimeStatus.STOPPED, request.reason)
            )
            return
        runtime = await self._runtime(cid)
        if runtime is None:
            await self._appender.append(_no_runtime(request))
            return
        if request.action == RuntimeControl.PAUSE:
            await runtime.sandbox.pause()
            runtime.paused = True
            status = RuntimeStatus.PAUSED
        else:
            await runtime.sandbox.resume()
            runtime.paused = False
            status = RuntimeStatus.READY
        await self._appender.append(self._status(request, status, request.reason))

    async def _remove_sandbox(self, cause: RuntimeControlRequested | ConversationDeleted) -> None:
        """Close the conversation's sandbox, if this runner holds one; a start requested before
        `cause` and still under way is void."""
        cid = cause.conversation_id
        self._stopped_at[cid] = max(self._stopped_at.get(cid, -1), cause.id)
        runtime = self._runtimes.pop(cid, None)
        if runtime is not None:
            self._in_transit += 1  # its container counts until it is gone
            try:
                await runtime.close()
            finally:
                self._in_transit -= 1
                await self._release_room()

    async def _delete(self, deleted: ConversationDeleted) -> None:
        """A deleted conversation leaves nothing on this host: its sandbox, if any, and its
        workspace and home go (the user's code and files with them)."""
        cid = deleted.conversation_id
        await self._remove_sandbox(deleted)
        self._journal.end(cid)
        await asyncio.to_thread(remove_conversation_directories, self._workspace_root, cid)
        logger.info("removed the sandbox and workspace of deleted conversation %s", cid)
        await self._appender.append(
            RuntimeStatusChanged(
                **reply_to(deleted), status=RuntimeStatus.STOPPED, reason="deleted"
            )
        )

    async def _execute(
        self, action: CmdRunAction | FileReadAction | FileWriteAction | FileEditAction | MCPAction
    ) -> None:
        runtime = await self._runtime(action.conversation_id)
        if runtime is None:
            await self._appender.append(_no_runtime(action))
            return
        if runtime.paused:
            await self._appender.append(
                ErrorObservation(
                    **reply_to(action), code="runtime_paused", content="The sandbox is paused."
                )
            )
            return
        observation: Event
        self._journal.begin(action.conversation_id, action.id)
        try:
            match action:
                case CmdRunAction():
                    observation = await self._run_command(runtime.sandbox, action)
                case FileReadAction():
                    observation = await runtime.files.read(action)
                case FileWriteAction():
                    observation = await runtime.files.write(action)
                case FileEditAction():
                    observation = await runtime.files.edit(action)
                case MCPAction():
                    observation = await _call_mcp(runtime, action)
        except ActionError as error:
            observation = ErrorObservation(
                **reply_to(action), code=error.code, content=error.message
            )
        except Exception as error:
            logger.exception("action %s of %s failed", action.id, action.conversation_id)
            observation = ErrorObservation(
                **reply_to(action), code="runtime_error", content=f"{type(error).__name__}: {error}"
            )
        # Done is done: through a broker outage the outcome waits here to be recorded (the
        # dispatcher keeps the action's message ours meanwhile) rather than failing the
        # delivery, whose redelivery would run the action again.
        await self._appender.append_until_stored(observation)
        self._journal.end(action.conversation_id)

    async def _run_command(self, sandbox: Sandbox, action: CmdRunAction) -> CmdOutputObservation:
        chunk_numbers = count()

        async def stream(text: str) -> None:
            """Output on the way, for the people watching: one the log cannot take now is
            dropped (the observation carries the whole output) and the command goes on."""
            chunk = CmdOutputChunk(**reply_to(action), content=text, seq=next(chunk_numbers))
            try:
                await self._appender.append(chunk)
            except Exception as error:
                if not is_unavailable(error):
                    raise
                logger.warning(
                    "output chunk %d of action %d dropped: %r", chunk.seq, action.id, error
                )

        request = CommandRequest(
            command=action.command,
            is_input=action.is_input,
            blocking=action.blocking,
            timeout=action.timeout,
            cwd=action.cwd,
        )
        outcome = await sandbox.run_command(request, stream)
        return CmdOutputObservation(
            **reply_to(action),
            command=action.command,
            content=outcome.content,
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            cwd=outcome.cwd,
            truncated_bytes=outcome.truncated_bytes,
        )


async def answer_cut_off_actions(
    js: JetStreamContext, appender: EventAppender, journal: InFlightJournal
) -> int:
    """Answer each action a crashed runner had begun with `runtime_restarted`: never run twice,
    never unanswered. Called at start-up before consuming, so the agent goes on at once rather
    than when JetStream redelivers the unacked action (`ack_wait` later); the redelivered action
    then finds its answer and is skipped. Returns how many were answered."""
    answered = 0
    for conversation_id, action_id in journal.entries().items():
        if not await is_answered(js, conversation_id, action_id, stream_sequence=0):
            await appender.append(_interrupted(conversation_id, action_id))
            answered += 1
        journal.end(conversation_id)
    return answered


def _interrupted(conversation_id: str, action_id: int) -> ErrorObservation:
    return ErrorObservation(
        conversation_id=conversation_id,
        source=EventSource.ENVIRONMENT,
        cause=action_id,
        code="runtime_restarted",
        content=(
            "The runtime-runner restarted while carrying out this action: it was stopped and its "
            "effects are unknown (it may have partly run). The sandbox and its files are kept; "
            "the shell was restarted, so the working directory and environment variables are "
            "reset."
        ),
    )


async def _call_mcp(runtime: _Runtime, action: MCPAction) -> Event:
    if runtime.mcp is None:
        raise ActionError("mcp_call_failed", "This conversation has no MCP servers.")
    return await runtime.mcp.call(action)


def _no_runtime(cause: Event) -> ErrorObservation:
    return ErrorObservation(
        **reply_to(cause),
        code="no_runtime",
        content="No sandbox is running for this conversation.",
    )
