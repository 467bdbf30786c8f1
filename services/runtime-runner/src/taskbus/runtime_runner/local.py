"""The local backend: a process sandbox in a per-conversation directory, for machines without
Docker. It isolates by directory, process group and rlimits only, not by namespaces.

Every process of a sandbox carries `TASKBUS_SANDBOX=<sandbox id>` in its environment, inherited
through forks, new sessions (`setsid`) and daemonising alike. Pause, resume and close signal
every process so marked, as well as the shell's process group, so nothing a command started
keeps running in a paused or removed sandbox. The shell dies with the runner (PDEATHSIG), but
what it started does not: the runner taking the workspace over after a restart (`reattach`)
kills the marked processes the dead runner's shell left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
from pathlib import Path
from typing import ClassVar

from taskbus.contracts.specs import Resources
from taskbus.runtime_runner.sandbox import (
    ShellProcess,
    sandbox_environment,
)
from taskbus.runtime_runner.shell import PersistentShell, ShellLimits
from taskbus.runtime_runner.workspace import (
    HostWorkspace,
    HostWorkspaceSandbox,
    conversation_directories,
)

_READ_SIZE = 64 * 1024
SANDBOX_MARKER = "TASKBUS_SANDBOX"
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


def _process_group(pid: int) -> int | None:
    """A process' group id, from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: state ppid pgrp ...
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def _pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    return [pid for pid in _pids() if _process_group(pid) == pgid]


def _is_marked(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _marked_processes(sandbox_id: str) -> list[int]:
    """The processes whose environment carries `sandbox_id`'s marker."""
    marker = f"{SANDBOX_MARKER}={sandbox_id}".encode()
    return [pid for pid in _pids() if _is_marked(pid, marker)]


def _signal_marked(sandbox_id: str, signum: signal.Signals) -> None:
    for pid in _marked_processes(sandbox_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


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
        self._workspace, self._home = conversation_directories(workspace_root, conversation_id)
        self._limits = limits
        self._clone_seconds = clone_seconds
        self.sandbox_id = f"local-{conversation_id}"
        self.workspace = str(self._workspace)
        self.files = HostWorkspace(self._workspace, self.workspace)
        self.shell = PersistentShell(self._spawn_shell, shell_limits, self.workspace)

    async def _spawn_shell(self) -> ShellProcess:
        environment = sandbox_environment(str(self._home))
        environment["PATH"] = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        environment[SANDBOX_MARKER] = self.sandbox_id
        return await LocalShellProcess.spawn(self._workspace, environment, self._limits)

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
            _signal_marked(self.sandbox_id, signal.SIGKILL)
            return True

        return await asyncio.to_thread(take_over)

    async def pause(self) -> None:
        await self._signal_all(signal.SIGSTOP)

    async def resume(self) -> None:
        await self._signal_all(signal.SIGCONT)

    async def close(self) -> None:
        await self.shell.close()
        await asyncio.to_thread(_signal_marked, self.sandbox_id, signal.SIGKILL)

    async def _signal_all(self, signum: signal.Signals) -> None:
        """The shell's group (a command may have dropped the marker) and every marked process."""
        await self.shell.signal(signum)
        await asyncio.to_thread(_signal_marked, self.sandbox_id, signum)
