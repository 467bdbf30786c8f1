"""A persistent shell per conversation: commands share cwd and environment, run one at a time.

Timeouts (as OpenHands' bash session, except that the hard limit kills):
- soft: a non-blocking command that prints nothing for `no_change_seconds` returns what it printed
  so far with `timed_out=soft` and keeps running. The next `CmdRunAction` with an empty command
  waits on, `is_input=True` sends a line to it, `C-c` interrupts it; a new command is refused.
- hard: a command runs at most `command_seconds` in total, or the action's `timeout` when that is
  smaller (so `timeout` is the per-command hard limit, as in OpenHands). Then its processes are
  interrupted, then killed, and `timed_out=hard` is reported. If the shell itself does not come
  back it is restarted, which the output says.
`blocking=True` disables the soft timeout: the action waits for the end or the hard limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable

import msgspec

from taskbus.contracts.events import CommandTimeout
from taskbus.runtime_runner.output import OutputCap
from taskbus.runtime_runner.sandbox import (
    ActionError,
    CommandOutcome,
    CommandRequest,
    OutputSink,
    ShellProcess,
    ShellSpawner,
)
from taskbus.runtime_runner.shell_protocol import Marker, MarkerParser, ShellProtocol

logger = logging.getLogger(__name__)

INTERRUPT = "C-c"
STREAM_INTERVAL_SECONDS = 0.2
_START_SECONDS = 10.0
_KILL_GRACE_SECONDS = 1.0


class ShellLimits(msgspec.Struct, frozen=True, kw_only=True):
    no_change_seconds: float
    command_seconds: float
    max_output_bytes: int
    max_streamed_bytes: int


class _Command:
    """A command sent to the shell, from its line until its outcome has been reported."""

    def __init__(self, line_id: int, text: str, hard_seconds: float, limits: ShellLimits) -> None:
        self.line_id = line_id
        self.text = text
        self.hard_seconds = hard_seconds
        self.started_at = time.monotonic()
        self.last_output_at = self.started_at
        self.unreported = OutputCap(limits.max_output_bytes)  # since the last observation
        self.unstreamed = OutputCap(limits.max_output_bytes)  # since the last chunk
        self.stream_budget = limits.max_streamed_bytes
        self.end: asyncio.Future[Marker | None] = asyncio.get_running_loop().create_future()
        self.hard_timed_out = False
        self.notes: list[str] = []
        self.watchdog: asyncio.Task[None] | None = None

    def add_output(self, data: bytes) -> None:
        self.last_output_at = time.monotonic()
        self.unreported.append(data)
        if self.stream_budget > 0:
            self.unstreamed.append(data)

    def finish(self, marker: Marker | None) -> None:
        if not self.end.done():
            self.end.set_result(marker)

    def take_chunk(self, max_output_bytes: int) -> str:
        """Output not yet streamed, within the command's streaming budget."""
        if not self.unstreamed or self.stream_budget <= 0:
            return ""
        chunk, self.unstreamed = self.unstreamed, OutputCap(max_output_bytes)
        self.stream_budget -= chunk.total_bytes
        text = chunk.text()
        if self.stream_budget <= 0:
            text += "\n[live output stopped here: the observation has the end of the output]\n"
        return text

    def take_report(self, max_output_bytes: int) -> tuple[str, int]:
        report, self.unreported = self.unreported, OutputCap(max_output_bytes)
        return report.text(), report.truncated_bytes


class PersistentShell:
    """Drives one long-lived bash through `ShellProtocol`; restarts it when it dies."""

    def __init__(self, spawn: ShellSpawner, limits: ShellLimits, workspace: str) -> None:
        self._spawn = spawn
        self._limits = limits
        self._cwd = workspace
        self._lock = asyncio.Lock()
        self._line_ids = 0
        self._current: _Command | None = None
        self._process: ShellProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self._exit_status = -1

    @property
    def alive(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        protocol = ShellProtocol()
        process = await self._spawn()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._process = process
        self._reader = asyncio.create_task(self._read(process, protocol, protocol.parser(), ready))
        await process.write(protocol.init_line())
        try:
            await asyncio.wait_for(ready, _START_SECONDS)
        except BaseException:
            await process.terminate()
            raise

    async def close(self) -> None:
        if self._current is not None and self._current.watchdog is not None:
            self._current.watchdog.cancel()
        if self._process is not None:
            await self._process.terminate()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def signal(self, signum: signal.Signals) -> None:
        if self._process is not None:
            await self._process.signal_group(signum)

    async def execute(self, request: CommandRequest, on_output: OutputSink) -> CommandOutcome:
        async with self._lock:
            command = await self._command_for(request)
            return await self._await_outcome(command, request.blocking, on_output)

    async def _command_for(self, request: CommandRequest) -> _Command:
        """The command this request is about: a new one, or the running one it talks to."""
        current = self._current
        text = request.command
        if current is None or (current.end.done() and text.strip() and not request.is_input):
            if request.is_input or not text.strip():
                raise ActionError(
                    "no_running_command", "No command is running to send input to or wait for."
                )
            return await self._start_command(request, finished=current)
        if current.end.done():
            if text:
                current.notes.append("[the command had already finished; the input was not sent]")
            return current
        if not request.is_input and text.strip():
            raise ActionError(
                "command_running",
                f'Command "{text}" was NOT executed: the previous command "{current.text}" is '
                "still running. Send an empty command to wait for it, is_input=true with text to "
                "answer it, or C-c to interrupt it.",
            )
        assert self._process is not None
        if request.is_input and text == INTERRUPT:
            await self._process.signal_group(signal.SIGINT)
        elif request.is_input and text:
            await self._process.write(text.encode() + b"\n")
        current.last_output_at = time.monotonic()
        return current

    async def _start_command(self, request: CommandRequest, finished: _Command | None) -> _Command:
        notes = []
        if finished is not None:
            exit_code = finished.end.result()
            status = exit_code.exit_code if exit_code is not None else "unknown"
            notes.append(
                f"[previous command {finished.text!r} had finished with exit code "
                f"{status}; its unread output was dropped]"
            )
        if not self.alive:
            await self.start()
            notes.append(
                "[a new shell was started: the previous one had exited, so the working "
                "directory and environment variables were reset]"
            )
        assert self._process is not None
        self._line_ids += 1
        hard_seconds = self._limits.command_seconds
        if request.timeout is not None:
            hard_seconds = min(hard_seconds, request.timeout)
        command = _Command(self._line_ids, request.command, hard_seconds, self._limits)
        command.notes.extend(notes)
        self._current = command
        await self._process.write(
            ShellProtocol.command_line(command.line_id, request.command, request.cwd)
        )
        command.watchdog = asyncio.create_task(self._enforce_hard_limit(command))
        return command

    async def _await_outcome(
        self, command: _Command, blocking: bool, on_output: OutputSink
    ) -> CommandOutcome:
        limit = self._limits.max_output_bytes
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(command.end), STREAM_INTERVAL_SECONDS)
            if command.end.done():
                return self._final_outcome(command)
            chunk = command.take_chunk(limit)
            if chunk:
                await on_output(chunk)
            quiet_for = time.monotonic() - command.last_output_at
            if not blocking and quiet_for >= self._limits.no_change_seconds:
                content, dropped = command.take_report(limit)
                note = (
                    f"[command still running: no new output for {quiet_for:.0f} s. Send an empty "
                    "command to keep waiting, is_input=true with text to answer it, or C-c to "
                    "interrupt it.]"
                )
                return CommandOutcome(
                    content=_with_notes(command.notes, content, note),
                    exit_code=-1,
                    timed_out=CommandTimeout.SOFT,
                    cwd=self._cwd,
                    truncated_bytes=dropped,
                )

    def _final_outcome(self, command: _Command) -> CommandOutcome:
        self._current = None
        if command.watchdog is not None:
            command.watchdog.cancel()
        marker = command.end.result()
        content, dropped = command.take_report(self._limits.max_output_bytes)
        trailer = ""
        if command.hard_timed_out:
            trailer = f"[command killed: it ran longer than {command.hard_seconds:g} s]"
        if marker is None:
            exit_code = self._exit_status
            trailer = (trailer + "\n" if trailer else "") + (
                "[the shell exited; the next command starts a new shell, with the working "
                "directory and environment variables reset]"
            )
        else:
            exit_code = marker.exit_code
        return CommandOutcome(
            content=_with_notes(command.notes, content, trailer),
            exit_code=exit_code,
            timed_out=CommandTimeout.HARD if command.hard_timed_out else CommandTimeout.NONE,
            cwd=self._cwd,
            truncated_bytes=dropped,
        )

    async def _enforce_hard_limit(self, command: _Command) -> None:
        """Interrupt, then kill, then replace the shell, until the command has ended."""
        await asyncio.sleep(command.started_at + command.hard_seconds - time.monotonic())
        process = self._process
        if command.end.done() or process is None:
            return
        command.hard_timed_out = True
        escalation: list[Callable[[], Awaitable[object]]] = [
            lambda: process.signal_group(signal.SIGINT),
            process.kill_children,
            process.terminate,
        ]
        for escalate in escalation:
            await escalate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(command.end), _KILL_GRACE_SECONDS)
            if command.end.done():
                return

    async def _read(
        self,
        process: ShellProcess,
        protocol: ShellProtocol,
        parser: MarkerParser,
        ready: asyncio.Future[None],
    ) -> None:
        while data := await process.read():
            for item in parser.feed(data):
                if isinstance(item, bytes):
                    if self._current is not None and ready.done():
                        self._current.add_output(item)
                elif protocol.is_ready(item):
                    self._cwd = item.cwd
                    if not ready.done():
                        ready.set_result(None)
                elif self._current is not None and item.line_id == str(self._current.line_id):
                    self._cwd = item.cwd
                    self._current.finish(item)
        self._exit_status = await process.terminate()  # also ends what the shell left running
        logger.info("shell exited with status %s", self._exit_status)
        if not ready.done():
            ready.set_exception(RuntimeError("the shell exited while starting"))
        if self._current is not None:
            self._current.finish(None)


def _with_notes(notes: list[str], content: str, trailer: str) -> str:
    parts = [*notes, content.rstrip("\n") if trailer else content, trailer]
    return "\n".join(part for part in parts if part)
