"""How much of the host each sandbox uses: the figures of its `ResourceUsage` events.

The kernel's own accounting is used where there is one: a local sandbox's cgroup (v1 or v2), or
a docker container's, read through the engine's stats. Only where a local sandbox has no cgroup
(a runner that may not create one) are its marked processes summed, and that sum misses what
exited between samples. The peak is the kernel's where it keeps one (v1 `max_usage_in_bytes`,
v2 `memory.peak`), and never less than the most any sample saw (`Peaks`). The workspace's size is
a walk capped at `MAX_WALKED_ENTRIES`, run off the event loop, so a huge workspace costs a
bounded time and gives a lower bound; and repeated only as often as keeps walking to a small
share of the time (`DiskGauge`), so sampling every few seconds does not walk a big workspace
every few seconds.

`UsageSampler` is the runner's one task that measures every live, unpaused sandbox each
interval. A measurement is no activity: session-manager's time limits ignore it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import EventSource, ResourceUsage

if TYPE_CHECKING:
    from taskbus.runtime_runner.sandbox import Sandbox

logger = logging.getLogger(__name__)

MAX_WALKED_ENTRIES = 200_000
# The share of time a sandbox's workspace may be walked: a small workspace is walked at every
# sample, one whose walk takes seconds a few times an hour.
DISK_WALK_SHARE = 0.01
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """One measurement: the figures of a `ResourceUsage` event, under the same names."""

    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    memory_peak_bytes: int = 0
    pids: int = 0
    disk_bytes: int = 0
    measured_by: str = ""


class UsageUnavailable(Exception):
    """The sandbox cannot be measured right now (gone, or its accounting unreadable)."""


# --- parsers: pure -------------------------------------------------------------------------------


def _integer(text: str) -> int:
    return int(text.strip() or 0)


def cgroup_v1_usage(
    memory_usage: str, memory_max_usage: str, cpuacct_usage: str, pids_current: str
) -> Usage:
    """From the v1 files `memory.usage_in_bytes`, `memory.max_usage_in_bytes`, `cpuacct.usage`
    (nanoseconds) and `pids.current`."""
    return Usage(
        cpu_seconds=_integer(cpuacct_usage) / 1e9,
        memory_bytes=_integer(memory_usage),
        memory_peak_bytes=_integer(memory_max_usage),
        pids=_integer(pids_current),
        measured_by="cgroup",
    )


def cgroup_v2_usage(
    memory_current: str, memory_peak: str | None, cpu_stat: str, pids_current: str
) -> Usage:
    """From the v2 files `memory.current`, `memory.peak` (None before Linux 5.19), `cpu.stat`
    (its `usage_usec` line) and `pids.current`."""
    cpu_micros = 0
    for line in cpu_stat.splitlines():
        name, _, value = line.partition(" ")
        if name == "usage_usec":
            cpu_micros = _integer(value)
    memory = _integer(memory_current)
    return Usage(
        cpu_seconds=cpu_micros / 1e6,
        memory_bytes=memory,
        memory_peak_bytes=_integer(memory_peak) if memory_peak is not None else memory,
        pids=_integer(pids_current),
        measured_by="cgroup",
    )


def docker_stats_usage(stats: dict[str, Any]) -> Usage:
    """From the engine's `GET /containers/{id}/stats` answer (one-shot): `max_usage` exists on
    cgroup v1 hosts only."""
    memory = stats.get("memory_stats") or {}
    cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
    pids = stats.get("pids_stats") or {}
    if "usage" not in memory:
        raise UsageUnavailable("the engine reports no memory usage (container not running)")
    usage = int(memory["usage"])
    return Usage(
        cpu_seconds=int(cpu.get("total_usage") or 0) / 1e9,
        memory_bytes=usage,
        memory_peak_bytes=int(memory.get("max_usage") or usage),
        pids=int(pids.get("current") or 0),
        measured_by="docker",
    )


def proc_stat_figures(stat_line: str) -> tuple[float, int]:
    """(CPU seconds of the process and of its waited-for children, resident bytes) from a
    `/proc/<pid>/stat` line."""
    # Fields after the parenthesised command name start at the 3rd (state); utime is the 14th.
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / _CLOCK_TICKS, int(fields[21]) * _PAGE_BYTES


def process_tree_usage(stat_lines: Iterable[str]) -> Usage:
    """The sum over a sandbox's processes, given their `/proc/<pid>/stat` lines."""
    cpu, memory, pids = 0.0, 0, 0
    for line in stat_lines:
        seconds, resident = proc_stat_figures(line)
        cpu += seconds
        memory += resident
        pids += 1
    return Usage(
        cpu_seconds=cpu,
        memory_bytes=memory,
        memory_peak_bytes=memory,
        pids=pids,
        measured_by="process-tree",
    )


class Peaks:
    """The running maxima of one sandbox: its peak is never less than a sample saw, and its CPU
    time never goes back (a process-tree sum loses what exited unwaited)."""

    def __init__(self) -> None:
        self._memory = 0
        self._cpu = 0.0

    def hold(self, usage: Usage) -> Usage:
        self._memory = max(self._memory, usage.memory_peak_bytes, usage.memory_bytes)
        self._cpu = max(self._cpu, usage.cpu_seconds)
        return msgspec.structs.replace(usage, memory_peak_bytes=self._memory, cpu_seconds=self._cpu)


# --- readers: blocking, run them off the event loop ---------------------------------------------


def read_cgroup(directories: list[Path]) -> Usage:
    """A sandbox cgroup's figures; `directories` are its v1 controllers' or its v2 directory."""

    def find(name: str) -> str | None:
        for directory in directories:
            with contextlib.suppress(FileNotFoundError):
                return (directory / name).read_text()
        return None

    def need(name: str) -> str:
        text = find(name)
        if text is None:
            raise UsageUnavailable(f"the sandbox's cgroup has no {name}")
        return text

    if (current := find("memory.current")) is not None:
        return cgroup_v2_usage(current, find("memory.peak"), need("cpu.stat"), need("pids.current"))
    return cgroup_v1_usage(
        need("memory.usage_in_bytes"),
        need("memory.max_usage_in_bytes"),
        need("cpuacct.usage"),
        need("pids.current"),
    )


def read_processes(pids: Iterable[int]) -> Usage:
    """The process-tree figures of `pids` (those gone meanwhile are left out)."""
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/stat").read_text())
    return process_tree_usage(lines)


def workspace_bytes(root: Path, max_entries: int = MAX_WALKED_ENTRIES) -> int:
    """Disk blocks used under `root`, each inode once, symlinks never followed (`fwalk` holds
    each directory open, so a directory swapped for a link mid-walk is not entered). Stops after
    `max_entries` entries: a lower bound for a workspace larger than that."""
    seen: set[tuple[int, int]] = set()
    total = 0
    entries = 0
    try:
        walk = os.fwalk(root, follow_symlinks=False)
        for _, directories, files, directory_fd in walk:
            for name in [*directories, *files]:
                entries += 1
                if entries > max_entries:
                    logger.debug("workspace %s has over %d entries: size capped", root, entries)
                    return total
                try:
                    info = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
                except OSError:  # removed meanwhile
                    continue
                key = (info.st_dev, info.st_ino)
                if key in seen:  # a hard link to an inode already counted
                    continue
                seen.add(key)
                total += info.st_blocks * 512
    except OSError as error:
        raise UsageUnavailable(f"cannot walk the workspace: {error}") from None
    return total


class DiskGauge:
    """A workspace's size (`workspace_bytes`), walked again only once the time since the last
    walk is that walk's duration over `walk_share`. Blocking: call it off the event loop."""

    def __init__(self, root: Path, walk_share: float = DISK_WALK_SHARE) -> None:
        self._root = root
        self._walk_share = walk_share
        self._next_walk = 0.0
        self._bytes = 0

    def bytes(self) -> int:
        started = time.monotonic()
        if started >= self._next_walk:
            self._bytes = workspace_bytes(self._root)
            took = time.monotonic() - started
            self._next_walk = started + took / self._walk_share
        return self._bytes


# --- the sampler ---------------------------------------------------------------------------------

LiveSandboxes = Callable[[], dict[str, "Sandbox"]]


class UsageSampler:
    """Every `interval` seconds, a `ResourceUsage` for each sandbox `live()` names (ready, not
    paused) whose figures changed since its last one. A sandbox that cannot be measured is
    skipped, with one warning until it can be again; nothing here stops the runner."""

    def __init__(self, appender: EventAppender, live: LiveSandboxes, interval: float) -> None:
        self._appender = appender
        self._live = live
        self._interval = interval
        self._peaks: weakref.WeakKeyDictionary[Sandbox, Peaks] = weakref.WeakKeyDictionary()
        self._last: weakref.WeakKeyDictionary[Sandbox, Usage] = weakref.WeakKeyDictionary()
        self._failing: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.sample_all()

    async def sample_all(self) -> None:
        live = self._live()
        self._failing &= live.keys()
        await asyncio.gather(*(self._sample(cid, sandbox) for cid, sandbox in live.items()))

    async def _sample(self, conversation_id: str, sandbox: Sandbox) -> None:
        try:
            usage = await sandbox.usage()
        except Exception as error:
            if conversation_id not in self._failing:
                self._failing.add(conversation_id)
                logger.warning("cannot measure the sandbox of %s: %r", conversation_id, error)
            return
        self._failing.discard(conversation_id)
        usage = self._peaks.setdefault(sandbox, Peaks()).hold(usage)
        if self._live().get(conversation_id) is not sandbox:
            return  # paused, stopped or replaced while it was measured
        if self._last.get(sandbox) == usage:
            return  # an idle sandbox adds nothing to the log
        try:
            await self._appender.append(
                ResourceUsage(
                    conversation_id=conversation_id,
                    source=EventSource.ENVIRONMENT,
                    **msgspec.structs.asdict(usage),
                )
            )
            self._last[sandbox] = usage
        except Exception as error:  # the next interval tries again
            logger.warning("cannot append the usage of %s: %r", conversation_id, error)
