"""The runner on the local backend killed with SIGKILL mid-command, then restarted (real
`python -m` processes): its sandboxes died with it, their workspaces did not, and live runtimes
go on in new sandboxes on the same workspaces. (Unsandboxed, what a command started outlives the
runner and `reattach` kills it by its marker.)"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    CmdOutputObservation,
    ErrorObservation,
    EventSource,
    RuntimeControl,
    RuntimeControlRequested,
    RuntimeStatusChanged,
)
from taskbus.contracts.status import RuntimeStatus

from .conftest import (
    RunnerProcess,
    forwarding,
    fresh_runner_id,
    until,
    wait_for_runner_consumer,
)
from .test_service import (
    command,
    read_log,
    reply_to,
    request_runtime,
    status,
    wait_for,
)


def control(cid: str, action: RuntimeControl) -> RuntimeControlRequested:
    return RuntimeControlRequested(conversation_id=cid, source=EventSource.AGENT, action=action)


def running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


async def test_a_local_runner_killed_mid_command_goes_on_in_the_same_workspaces(
    js: JetStreamContext, nats_url: str, tmp_path: Path, runner_processes: list[RunnerProcess]
) -> None:
    runner_id = fresh_runner_id()
    environment = {
        "TASKBUS_NATS_URL": nats_url,
        "TASKBUS_BACKEND": "local",
        "TASKBUS_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
        "TASKBUS_RUNNER_ID": runner_id,
        "TASKBUS_NO_CHANGE_SECONDS": "5",
        # Far longer than the test: a cut-off action must be answered without a redelivery.
        "TASKBUS_ACK_WAIT_SECONDS": "300",
    }
    async with forwarding(js, runner_id):
        log = tmp_path / "runner.log"
        runner_processes.append(RunnerProcess(environment, log))
        await wait_for_runner_consumer(js, runner_id)
        appender = EventAppender(js)
        cid, paused_cid, gone_cid = (uuid.uuid4().hex for _ in range(3))
        workspaces: dict[str, str] = {}
        for each in (cid, paused_cid, gone_cid):
            requested = await appender.append(request_runtime(each))
            ready = await wait_for(js, each, status(requested, RuntimeStatus.READY), seconds=20)
            assert isinstance(ready, RuntimeStatusChanged)
            workspaces[each] = ready.workspace
        prepared = await appender.append(command(cid, "echo kept > state.txt && cd /tmp"))
        await wait_for(js, cid, reply_to(prepared, CmdOutputObservation))
        pause = await appender.append(control(paused_cid, RuntimeControl.PAUSE))
        await wait_for(js, paused_cid, status(pause, RuntimeStatus.PAUSED))

        sleeper = f"sleep 60.{random.randrange(10**6):06d}"  # this test's own process to look for
        in_flight = await appender.append(command(cid, f"{sleeper}; echo never", blocking=True))
        await until(lambda: running(sleeper), "the command is running")
        runner_processes[0].kill(signal.SIGKILL)
        # Under bubblewrap the whole sandbox (its own pid namespace) dies with the runner.
        await until(lambda: not running(sleeper), "the sandbox's command died with the runner")
        await asyncio.to_thread(shutil.rmtree, workspaces[gone_cid])

        runner_processes.append(RunnerProcess(environment, log))
        interrupted = await wait_for(js, cid, reply_to(in_flight, ErrorObservation), seconds=20)
        assert isinstance(interrupted, ErrorObservation)
        assert interrupted.code == "runtime_restarted"
        assert not any(  # answered once, never re-run
            reply_to(in_flight, CmdOutputObservation)(event) for event in await read_log(js, cid)
        )
        after = await appender.append(
            command(cid, f"cat state.txt; pwd; pgrep -f '{sleeper}' || echo no-leftovers")
        )
        continued = await wait_for(js, cid, reply_to(after, CmdOutputObservation))
        assert isinstance(continued, CmdOutputObservation)
        assert "a new shell was started" in continued.content
        assert continued.content.splitlines()[-3:] == ["kept", workspaces[cid], "no-leftovers"]

        # A paused runtime stays paused until it is resumed.
        refused = await appender.append(command(paused_cid, "echo while paused"))
        error = await wait_for(js, paused_cid, reply_to(refused, ErrorObservation))
        assert isinstance(error, ErrorObservation) and error.code == "runtime_paused"
        resume = await appender.append(control(paused_cid, RuntimeControl.RESUME))
        resumed = await wait_for(js, paused_cid, status(resume, RuntimeStatus.READY))
        assert isinstance(resumed, RuntimeStatusChanged)
        assert resumed.workspace == workspaces[paused_cid]
        works = await appender.append(command(paused_cid, "pwd"))
        observation = await wait_for(js, paused_cid, reply_to(works, CmdOutputObservation))
        assert isinstance(observation, CmdOutputObservation)
        assert observation.content.splitlines()[-1] == workspaces[paused_cid]

        # A runtime whose workspace is gone cannot go on.
        lost = await appender.append(command(gone_cid, "echo hi"))
        error = await wait_for(js, gone_cid, reply_to(lost, ErrorObservation))
        assert isinstance(error, ErrorObservation) and error.code == "no_runtime"

        runner_processes[1].kill(signal.SIGTERM)
        assert runner_processes[1].process.returncode == 0, log.read_text()
        assert "took over the workspace of conversation " + cid in log.read_text()
    await js.delete_consumer(
        subjects.RUNNER_WORK_STREAM, subjects.runtime_runner_durable(runner_id)
    )
