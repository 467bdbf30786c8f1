"""`taskbus up` / `down` / `status` as real processes, and the CLI against the stack it starts.

One stack for the module (its scripted agent runs `sleep`, so a sandbox is alive while the tests
run); the last test stops it with SIGINT and checks nothing of it is left: no process, no
container. The conflict tests start their own `up`, which must fail fast."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import docker
import msgspec
import pytest

from taskbus.devtools.local_stack import pid_alive, sandbox_label
from taskbus.devtools.nats_server import free_port

CLI = [sys.executable, "-m", "taskbus.devtools.cli"]
SLEEPY_SCRIPT = {
    "steps": [
        {
            "content": "Planning.",
            "tool_calls": [
                {
                    "name": "task_tracker",
                    "arguments": {
                        "command": "plan",
                        "task_list": [{"id": "1", "title": "Wait", "status": "in_progress"}],
                    },
                }
            ],
        },
        {"tool_calls": [{"name": "execute_bash", "arguments": {"command": "sleep 600"}}]},
    ]
}


class Launched(msgspec.Struct, kw_only=True):
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    data_dir: Path
    log: Path


def up_env(tmp: Path, **settings: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKBUS_")}
    return {
        **clean,
        "XDG_CONFIG_HOME": str(tmp / "config"),
        "TASKBUS_DATA_DIR": str(tmp / "data"),
        "TASKBUS_PORT": str(free_port()),
        "TASKBUS_NATS_PORT": str(free_port()),
        "TASKBUS_RUNNER_ID": f"launcher-{free_port()}",
        "TASKBUS_USAGE_INTERVAL_SECONDS": "3600",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "COLUMNS": "200",
        **settings,
    }


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*CLI, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_text(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"taskbus up exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} within 120 s:\n{log.read_text()}"
        time.sleep(0.2)


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    tmp = tmp_path_factory.mktemp("up")
    script = tmp / "script.json"
    script.write_text(json.dumps(SLEEPY_SCRIPT))
    env = up_env(tmp, TASKBUS_SCRIPTED_MODEL_SCRIPT=str(script))
    log = tmp / "up.log"
    process = start_up(env, log)
    try:
        wait_for_text(log, "Taskbus is up.", process)
        yield Launched(process=process, env=env, data_dir=tmp / "data", log=log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_up_says_what_started_and_writes_the_cli_config(stack: Launched) -> None:
    printed = stack.log.read_text()
    for name in ("nats-server", "scripted model", "event-store", "session-manager", "gateway"):
        assert f"ready    {name}" in printed
    status = cli(stack.env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "gateway http://127.0.0.1:" in status.stdout and ": ready" in status.stdout
    for name in ("taskbus up", "nats-server", "gateway", "runtime-runner"):
        assert name in status.stdout
    # Any directory: the CLI finds the stack through the config file `up` wrote.
    listed = subprocess.run(
        [*CLI, "ls"], env=stack.env, cwd="/", capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and listed.stdout.split()[:1] in (["ID"], ["no"])


def test_a_second_up_refuses_and_touches_nothing(stack: Launched) -> None:
    logs = sorted((stack.data_dir / "logs").glob("*.log"))
    sizes = {log: log.stat().st_size for log in logs}
    nats_log = stack.data_dir / "nats" / "nats-server.log"
    nats_size = nats_log.stat().st_size
    credential = (stack.data_dir / "bus" / "gateway.json").read_bytes()
    second = cli(stack.env, "up")
    line = one_line_error(second.stderr)
    assert second.returncode == 2 and f"pid {stack.process.pid}" in line and "taskbus down" in line
    assert all(log.stat().st_size >= size for log, size in sizes.items())
    assert nats_log.stat().st_size >= nats_size
    assert (stack.data_dir / "bus" / "gateway.json").read_bytes() == credential
    assert cli(stack.env, "status").returncode == 0


def test_errors_against_a_running_gateway_are_one_line(stack: Launched) -> None:
    unknown = cli(stack.env, "watch", "0" * 32)
    line = one_line_error(unknown.stderr)
    assert unknown.returncode == 1 and "no conversation" in line and "taskbus ls" in line
    wrong_key = cli({**stack.env, "TASKBUS_API_KEY": "tb_wrong"}, "ls")
    line = one_line_error(wrong_key.stderr)
    assert wrong_key.returncode == 1 and "refused the API key" in line
    assert "TASKBUS_API_KEY" in line and "tb_wrong" not in line


def test_ctrl_c_in_run_says_the_task_goes_on_and_how_to_stop_it(stack: Launched) -> None:
    run = subprocess.Popen(
        [*CLI, "run", "wait a while"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    first = run.stdout.readline()  # "conversation <id>"
    assert first.startswith("conversation "), first
    cid = first.split()[1]
    # Wait for its command to run: the sandbox is alive for the last test.
    for line in run.stdout:
        if "CmdRunAction" in line:
            break
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    line = one_line_error(stderr)
    assert run.returncode == 130
    assert f"conversation {cid} keeps running" in line and f"taskbus stop {cid}" in line
    shown = cli(stack.env, "show", cid)
    assert json.loads(shown.stdout)["taskbus_status"] == "RUNNING"


def test_ctrl_c_leaves_no_process_and_no_container(stack: Launched) -> None:
    """Runs last: it stops the module's stack."""
    pids = [int(p.read_text()) for p in (stack.data_dir / "pids").glob("*.pid")]
    assert len(pids) >= 5
    label = sandbox_label(stack.data_dir.resolve())
    engine = docker.from_env()
    running = engine.containers.list(filters={"label": label})
    assert running, "the running task's sandbox should be up before the stop"
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(90) == 0
    assert "Taskbus stopped." in stack.log.read_text()
    assert [pid for pid in [stack.process.pid, *pids] if pid_alive(pid)] == []
    for pid in pids:  # nothing a child started survives in its group either
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert engine.containers.list(all=True, filters={"label": label}) == []
    engine.close()


class _NotOurs(BaseHTTPRequestHandler):
    """Another stack's gateway: healthy, but without this launch's nonce."""

    def do_GET(self) -> None:
        body = b'{"status": "ok", "nats": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_gateway_port_held_by_another_server_fails_fast(tmp_path: Path) -> None:
    other = HTTPServer(("127.0.0.1", 0), _NotOurs)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        env = up_env(tmp_path, TASKBUS_PORT=str(other.server_address[1]))
        done = cli(env, "up", timeout=120)
    finally:
        other.shutdown()
    assert done.returncode == 1
    assert "Taskbus is up" not in done.stdout  # the other server's health never counted
    # The supervisor's own warning may come first; then the error and the log's tail.
    lines = done.stderr.strip().splitlines()
    [first] = [line for line in lines if line.startswith("error: ")]
    tail = lines[lines.index(first) + 1 :]
    assert first.startswith("error: gateway exited with code") and "gateway.log" in first
    assert any("address already in use" in line for line in tail), done.stderr
    pids = [int(p.read_text()) for p in (tmp_path / "data" / "pids").glob("*.pid")]
    assert pids and not [pid for pid in pids if pid_alive(pid)]


def test_a_nats_port_in_use_fails_fast_with_the_servers_log(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = up_env(tmp_path, TASKBUS_NATS_PORT=str(held.getsockname()[1]))
        done = cli(env, "up", timeout=60)
    assert done.returncode == 1
    first, *tail = done.stderr.strip().splitlines()
    assert first.startswith("error: nats-server did not start") and "TASKBUS_NATS_PORT" in first
    assert any("address already in use" in line for line in tail), done.stderr
