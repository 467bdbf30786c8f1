"""The local backend: a process sandbox in a per-conversation directory, for machines without
Docker. It isolates by directory, process group and rlimits only, not by namespaces.

The shell dies with the runner (PDEATHSIG), but what it started does not. Each shell's session
is therefore recorded in `<workspace_root>/.runner/shells/<cid>`, so that the runner taking the
workspace over after a restart (`reattach`) can kill what the dead runner's shell left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
from pathlib import Path
from typing import ClassVar, NamedTuple

from taskbus.contracts.specs import Resources
from taskbus.runtime_runner.sandbox import (
    ShellProcess,
    sandbox_environment,
)
from taskbus.runtime_runner.shell import PersistentShell, ShellLimits
from taskbus.runtime_runner.workspace import HostWorkspace, HostWorkspaceSandbox

_READ_SIZE = 64 * 1024
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class LocalLimits:
    """rlimits of a local sandbox's processes. RLIMIT_NPROC is per user, so it is not used."""

    def __init__(self, max_file_bytes: int, resources: Resources) -> None:
        self.max_file_bytes = max_file_bytes
        self.memory_bytes = resources.memory_mb * 1024 * 1024 if resources.memory_mb else None

    def apply(self) -> None:
        """Runs in the child between fork and exec."""
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))
        if self.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        # Die with the runner instead of lingering as an orphan.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalShellProcess:
    """`bash -i` on pipes, leader of its own session and process group."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        """The shell's pid, also its process group and session id."""
        return self._process.pid

    @classmethod
    async def spawn(
        cls, cwd: Path, environment: dict[str, str], limits: LocalLimits
    ) -> LocalShellProcess:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "--norc",
            "--noprofile",
            "--noediting",
            "-i",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
            env=environment,
            start_new_session=True,
            preexec_fn=limits.apply,
        )
        return cls(process)

    async def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._process.stdin.write(data)
            await self._process.stdin.drain()

    async def read(self) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.read(_READ_SIZE)

    async def signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    async def kill_children(self) -> None:
        for pid in await asyncio.to_thread(_group_members, self._process.pid):
            if pid != self._process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def terminate(self) -> int:
        await self.signal_group(signal.SIGKILL)
        return await self._process.wait()


class _ProcessStat(NamedTuple):
    pid: int
    group: int
    session: int
    # Clock ticks after boot: with the pid, it tells a process from a later one reusing the pid.
    start_time: int


def _process_stat(pid: int) -> _ProcessStat | None:
    """A process' ids and start time, from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: state ppid pgrp session ... starttime
    fields = stat[stat.rindex(")") + 2 :].split()
    return _ProcessStat(pid, int(fields[2]), int(fields[3]), int(fields[19]))


def _process_stats() -> list[_ProcessStat]:
    """Every process' ids and start time."""
    stats = (
        _process_stat(int(entry.name)) for entry in os.scandir("/proc") if entry.name.isdigit()
    )
    return [stat for stat in stats if stat is not None]


def _group_members(pgid: int) -> list[int]:
    return [process.pid for process in _process_stats() if process.group == pgid]


def _record_session(record: Path, pid: int) -> None:
    """Note the shell's session (its pid and start time) for the runner after a restart."""
    shell = _process_stat(pid)
    if shell is not None:  # else it has already exited, leaving nothing behind to kill
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{pid} {shell.start_time}")


def _kill_recorded_session(record: Path) -> None:
    """SIGKILL whatever is left of the recorded shell session (started by a dead runner)."""
    try:
        session, started = map(int, record.read_text().split())
    except (FileNotFoundError, ValueError):
        return
    members = [process for process in _process_stats() if process.session == session]
    if any(process.pid == session and process.start_time != started for process in members):
        return  # the pid now leads another session: ours is gone, and its processes with it
    for process in members:
        if process.start_time >= started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


class LocalSandbox(HostWorkspaceSandbox):
    backend: ClassVar[str] = "local"

    def __init__(
        self,
        conversation_id: str,
        workspace_root: Path,
        shell_limits: ShellLimits,
        limits: LocalLimits,
        clone_seconds: float,
    ) -> None:
        root = workspace_root.resolve()
        self._workspace = root / conversation_id
        self._home = root / ".home" / conversation_id
        self._session_record = root / ".runner" / "shells" / conversation_id
        self._limits = limits
        self._clone_seconds = clone_seconds
        self.sandbox_id = f"local-{conversation_id}"
        self.workspace = str(self._workspace)
        self.files = HostWorkspace(self._workspace, self.workspace)
        self.shell = PersistentShell(self._spawn_shell, shell_limits, self.workspace)

    async def _spawn_shell(self) -> ShellProcess:
        environment = sandbox_environment(str(self._home))
        environment["PATH"] = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        process = await LocalShellProcess.spawn(self._workspace, environment, self._limits)
        await asyncio.to_thread(_record_session, self._session_record, process.pid)
        return process

    async def start(self, repository_url: str | None, branch: str | None) -> None:
        await self._prepare_workspace(self._home, repository_url, branch, self._clone_seconds)
        await self.shell.start()

    async def reattach(self) -> bool:
        """Take over this conversation's workspace after a runner restart: kill what the dead
        runner's shell left running; the next command starts a new shell. False when the
        workspace is gone."""

        def take_over() -> bool:
            if not self._workspace.is_dir():
                return False
            self._home.mkdir(parents=True, exist_ok=True)
            _kill_recorded_session(self._session_record)
            return True

        return await asyncio.to_thread(take_over)

    async def pause(self) -> None:
        await self.shell.signal(signal.SIGSTOP)

    async def resume(self) -> None:
        await self.shell.signal(signal.SIGCONT)

    async def close(self) -> None:
        await self.shell.close()
        await asyncio.to_thread(self._session_record.unlink, missing_ok=True)
