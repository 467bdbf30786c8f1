"""Resource usage: the parsers on real kernel and engine shapes, the measurement of real
sandboxes on every backend, and the sampler through the runner and a real JetStream."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    CmdOutputObservation,
    EventSource,
    ResourceUsage,
    RuntimeControl,
    RuntimeControlRequested,
)
from taskbus.contracts.status import RuntimeStatus
from taskbus.runtime_runner.app import RuntimeRunnerService
from taskbus.runtime_runner.local import SANDBOX_MARKER, _marked_processes
from taskbus.runtime_runner.sandbox import CommandRequest
from taskbus.runtime_runner.settings import RuntimeRunnerSettings
from taskbus.runtime_runner.usage import (
    DiskGauge,
    Peaks,
    Usage,
    UsageUnavailable,
    cgroup_v1_usage,
    cgroup_v2_usage,
    docker_stats_usage,
    process_tree_usage,
    read_processes,
    workspace_bytes,
)

from .conftest import SandboxMaker, forwarding, fresh_runner_id, wait_for_runner_consumer
from .test_service import (
    command,
    read_log,
    reply_to,
    request_runtime,
    status,
    wait_for,
)

MB = 1024 * 1024
T = datetime(2025, 1, 1, tzinfo=UTC)


def test_usage_names_the_figures_of_the_event() -> None:
    """The sampler builds the event from a Usage by name: every figure must be a field there."""
    assert set(Usage.__struct_fields__) <= set(ResourceUsage.__struct_fields__)


def test_cgroup_v1_files() -> None:
    usage = cgroup_v1_usage("1048576\n", "230686720\n", "2500000000\n", "7\n")
    assert usage == Usage(
        cpu_seconds=2.5,
        memory_bytes=MB,
        memory_peak_bytes=220 * MB,
        pids=7,
        measured_by="cgroup",
    )


def test_cgroup_v2_files_with_and_without_memory_peak() -> None:
    cpu_stat = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
    usage = cgroup_v2_usage("4096\n", "8192\n", cpu_stat, "3\n")
    assert (usage.cpu_seconds, usage.memory_bytes, usage.memory_peak_bytes, usage.pids) == (
        1.5,
        4096,
        8192,
        3,
    )
    # Before Linux 5.19 there is no memory.peak: the current figure is all there is.
    assert cgroup_v2_usage("4096\n", None, cpu_stat, "3\n").memory_peak_bytes == 4096


def test_docker_stats_on_v1_and_v2_hosts_and_a_stopped_container() -> None:
    v1 = {
        "memory_stats": {"usage": 716800, "max_usage": 224157696, "limit": 536870912},
        "cpu_stats": {"cpu_usage": {"total_usage": 229154686}},
        "pids_stats": {"current": 1},
    }
    usage = docker_stats_usage(v1)
    assert usage.memory_peak_bytes == 224157696 and usage.memory_bytes == 716800
    assert usage.cpu_seconds == pytest.approx(0.229154686) and usage.pids == 1
    assert usage.measured_by == "docker"
    v2 = {**v1, "memory_stats": {"usage": 716800}}
    assert docker_stats_usage(v2).memory_peak_bytes == 716800
    with pytest.raises(UsageUnavailable):
        docker_stats_usage({"memory_stats": {}, "cpu_stats": {}, "pids_stats": {}})


def test_process_tree_reads_a_command_name_with_spaces_and_parentheses() -> None:
    fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0"]
    # utime stime cutime cstime, then priority .. and rss (the 24th field) in pages.
    fields += ["100", "50", "30", "20", "20", "0", "1", "0", "0", "0", "25"]
    line = f"4242 (evil) (name) {' '.join(fields)} 0 0\n"
    usage = process_tree_usage([line, line])
    ticks = os.sysconf("SC_CLK_TCK")
    assert usage.cpu_seconds == pytest.approx(2 * 200 / ticks)
    assert usage.memory_bytes == 2 * 25 * os.sysconf("SC_PAGE_SIZE")
    assert usage.pids == 2 and usage.measured_by == "process-tree"


def test_peaks_never_go_back() -> None:
    peaks = Peaks()
    first = peaks.hold(Usage(cpu_seconds=3.0, memory_bytes=300, memory_peak_bytes=300))
    later = peaks.hold(Usage(cpu_seconds=1.0, memory_bytes=100, memory_peak_bytes=100))
    assert (first.memory_peak_bytes, first.cpu_seconds) == (300, 3.0)
    assert (later.memory_bytes, later.memory_peak_bytes, later.cpu_seconds) == (100, 300, 3.0)


def test_workspace_size_counts_inodes_once_and_never_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "host-file"
    outside.write_bytes(os.urandom(8 * MB))
    workspace = tmp_path / "workspace"
    (workspace / "sub").mkdir(parents=True)
    (workspace / "sub" / "data").write_bytes(os.urandom(MB))
    os.link(workspace / "sub" / "data", workspace / "hard-link")
    (workspace / "to-host-file").symlink_to(outside)
    (workspace / "to-host-dir").symlink_to(tmp_path)
    size = workspace_bytes(workspace)
    assert MB <= size < 2 * MB  # the MiB once; the 8 MiB behind the links not at all


def test_workspace_size_walk_is_capped(tmp_path: Path) -> None:
    for index in range(50):
        (tmp_path / f"f{index}").write_bytes(b"x" * 5000)
    full = workspace_bytes(tmp_path)
    capped = workspace_bytes(tmp_path, max_entries=10)
    assert 0 < capped < full


def test_the_disk_gauge_walks_again_only_after_its_share_of_time(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 5000)
    sparing = DiskGauge(tmp_path, walk_share=1e-9)  # the next walk is hours away
    eager = DiskGauge(tmp_path)
    first = sparing.bytes()
    assert first == eager.bytes() > 0
    (tmp_path / "b").write_bytes(b"x" * 50_000)
    # A small workspace's walk takes about a millisecond: walked again a tenth of a second on.
    deadline = time.monotonic() + 5
    while eager.bytes() == first:
        assert time.monotonic() < deadline, "the eager gauge never walked again"
        time.sleep(0.05)
    assert sparing.bytes() == first


def test_a_missing_workspace_cannot_be_measured(tmp_path: Path) -> None:
    with pytest.raises(UsageUnavailable):
        workspace_bytes(tmp_path / "gone")


def test_process_tree_of_marked_processes() -> None:
    """Without a cgroup the figures are the sum over the processes carrying the marker."""
    sandbox_id = f"usage-test-{uuid.uuid4().hex[:8]}"
    script = "b = bytearray(120 << 20); import time; print('ok', flush=True); time.sleep(20)"
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, SANDBOX_MARKER: sandbox_id},
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ok\n"
        pids = _marked_processes(sandbox_id)
        assert pids == [process.pid]
        usage = read_processes(pids)
        assert usage.memory_bytes >= 120 * MB and usage.pids == 1
        assert usage.cpu_seconds > 0
        assert read_processes([]) == Usage(measured_by="process-tree")
    finally:
        process.kill()
        process.wait()


async def test_sandbox_measures_memory_peak_cpu_pids_and_disk(
    make_sandbox: SandboxMaker,
) -> None:
    sandbox = await make_sandbox()
    await sandbox.write_bytes("blob.bin", os.urandom(3 * MB))
    before = await sandbox.usage()
    assert before.disk_bytes >= 3 * MB
    assert before.memory_peak_bytes < 150 * MB
    allocate = (
        'python3 -c "b = bytearray(160*1024*1024); import time; time.sleep(0.5)" && echo allocated'
    )
    # Blocking: a loaded host may take longer than the quiet limit (1 s) to allocate in silence.
    request = CommandRequest(command=allocate, timeout=20, blocking=True)
    outcome = await sandbox.run_command(request, _ignore)
    assert "allocated" in outcome.content, outcome
    after = await sandbox.usage()
    assert after.memory_peak_bytes >= 160 * MB
    assert after.memory_bytes < after.memory_peak_bytes  # the allocation is gone
    assert after.cpu_seconds > before.cpu_seconds
    assert after.pids >= 1
    assert after.measured_by == ("docker" if sandbox.backend == "docker" else "cgroup")


async def _ignore(_: str) -> None:
    return None


# --- the sampler through the runner ---------------------------------------------------------------


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> RuntimeRunnerSettings:
    return RuntimeRunnerSettings(
        nats_url=nats_url,
        backend="local",
        workspace_root=str(tmp_path / "workspaces"),
        usage_interval_seconds=0.3,
        runner_id=fresh_runner_id(),
    )


async def test_sampler_reports_while_ready_and_not_while_paused_or_after_stop(
    settings: RuntimeRunnerSettings, js: JetStreamContext
) -> None:
    async with forwarding(js, settings.runner_id):
        stop = asyncio.Event()
        service = asyncio.create_task(RuntimeRunnerService(settings).run(stop))
        try:
            await wait_for_runner_consumer(js, settings.runner_id)
            cid = uuid.uuid4().hex
            appender = EventAppender(js)
            requested = await appender.append(request_runtime(cid))
            ready = await wait_for(js, cid, status(requested, RuntimeStatus.READY))
            first = await wait_for(js, cid, lambda e: isinstance(e, ResourceUsage))
            assert isinstance(first, ResourceUsage)
            assert first.id > ready.id and first.source == EventSource.ENVIRONMENT
            assert first.measured_by == "cgroup" and first.pids >= 1

            pause = await appender.append(_control(cid, RuntimeControl.PAUSE))
            paused = await wait_for(js, cid, status(pause, RuntimeStatus.PAUSED))
            await asyncio.sleep(1.5)  # five intervals
            resume = await appender.append(_control(cid, RuntimeControl.RESUME))
            await wait_for(js, cid, status(resume, RuntimeStatus.READY))
            write = await appender.append(command(cid, "head -c 300000 /dev/urandom > grown.bin"))
            written = await wait_for(js, cid, reply_to(write, CmdOutputObservation))
            grown = await wait_for(
                js, cid, lambda e: isinstance(e, ResourceUsage) and e.id > written.id
            )
            assert isinstance(grown, ResourceUsage) and grown.disk_bytes >= 300000

            halt = await appender.append(_control(cid, RuntimeControl.STOP))
            stopped = await wait_for(js, cid, status(halt, RuntimeStatus.STOPPED))
            await asyncio.sleep(1.5)
            log = await read_log(js, cid)
            samples = [e for e in log if isinstance(e, ResourceUsage)]
            assert not [e for e in samples if paused.id < e.id < resume.id]
            assert not [e for e in samples if e.id > stopped.id]
            assert len(samples) >= 2
            # Only changes are appended: an idle sandbox adds nothing to the log.
            figures = [msgspec.structs.replace(e, id=0, timestamp=T) for e in samples]
            assert all(a != b for a, b in itertools.pairwise(figures))
            # A measurement belongs to no action: nothing waits on it.
            assert all(e.cause is None for e in samples)
        finally:
            stop.set()
            await asyncio.wait_for(service, 10)
    await js.delete_consumer(
        subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(settings.runner_id)
    )


def _control(cid: str, action: RuntimeControl) -> RuntimeControlRequested:
    return RuntimeControlRequested(
        conversation_id=cid, source=EventSource.USER, action=action, reason="test"
    )
