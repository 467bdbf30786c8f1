"""Memory, pids and CPU limits of a local sandbox as a cgroup of its own (v1 or v2).

rlimits cannot contain a fork bomb without hurting the neighbours: RLIMIT_NPROC counts every
process of a uid, and all local sandboxes share one. A cgroup per sandbox can, and its memory
limit holds tmpfs pages and children too, which RLIMIT_AS does not. Creating cgroups needs the
runner to own the hierarchy (root, or a delegated subtree); otherwise `create` returns None and
the sandbox falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from taskbus.runtime_runner.limits import SandboxResources

logger = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
GROUP = "taskbus-sandboxes"
_CPU_PERIOD_US = 100_000
_REMOVE_SECONDS = 2.0


def _limits_v1(resources: SandboxResources) -> dict[str, dict[str, str]]:
    memory = str(resources.memory_mb * 1024 * 1024)
    return {
        "memory": {"memory.limit_in_bytes": memory},
        "pids": {"pids.max": str(resources.pids)},
        "cpu": {
            "cpu.cfs_period_us": str(_CPU_PERIOD_US),
            "cpu.cfs_quota_us": str(int(resources.cpus * _CPU_PERIOD_US)),
        },
        "cpuacct": {},  # no limit: it counts the CPU time of `ResourceUsage` (see usage.py)
    }


def _limits_v2(resources: SandboxResources) -> dict[str, str]:
    return {
        "memory.max": str(resources.memory_mb * 1024 * 1024),
        "memory.swap.max": "0",
        "pids.max": str(resources.pids),
        "cpu.max": f"{int(resources.cpus * _CPU_PERIOD_US)} {_CPU_PERIOD_US}",
    }


class SandboxCgroup:
    """One sandbox's cgroup directories (one per v1 controller, or one v2 directory)."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories

    @classmethod
    def create(cls, sandbox_id: str, resources: SandboxResources) -> SandboxCgroup | None:
        """The sandbox's cgroup with its limits written, or None where cgroups are not ours."""
        try:
            if (ROOT / "cgroup.controllers").exists():
                return cls._create_v2(sandbox_id, resources)
            return cls._create_v1(sandbox_id, resources)
        except OSError as error:
            logger.debug("no cgroup for %s (rlimits only): %s", sandbox_id, error)
            return None

    @classmethod
    def _create_v1(cls, sandbox_id: str, resources: SandboxResources) -> SandboxCgroup:
        directories: list[Path] = []
        for controller, files in _limits_v1(resources).items():
            directory = ROOT / controller / GROUP / sandbox_id
            directory.mkdir(parents=True, exist_ok=True)
            for name, value in files.items():
                (directory / name).write_text(value)
            # Controllers mounted together (cpu,cpuacct) share one directory: listed once.
            if not any(directory.samefile(known) for known in directories):
                directories.append(directory)
        return cls(directories)

    @classmethod
    def _create_v2(cls, sandbox_id: str, resources: SandboxResources) -> SandboxCgroup:
        parent = ROOT / GROUP
        parent.mkdir(exist_ok=True)
        # Leaves only: v2 puts no process in a cgroup whose controllers are delegated down.
        (ROOT / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        directory = parent / sandbox_id
        directory.mkdir(exist_ok=True)
        for name, value in _limits_v2(resources).items():
            (directory / name).write_text(value)
        return cls([directory])

    def join(self) -> None:
        """Move the calling process in; runs in the child between fork and exec, as root."""
        pid = str(os.getpid()).encode()
        for directory in self.directories:
            fd = os.open(directory / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def _members(self) -> set[int]:
        pids: set[int] = set()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                pids.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
        return pids

    def remove(self) -> None:
        """Kill what is left in the cgroup and remove it (blocking; run it off the loop)."""
        deadline = time.monotonic() + _REMOVE_SECONDS
        while (members := self._members()) and time.monotonic() < deadline:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for directory in self.directories:
            try:
                directory.rmdir()
            except OSError as error:
                logger.warning("cannot remove cgroup %s: %s", directory, error)
