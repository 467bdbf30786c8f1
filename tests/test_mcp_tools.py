"""MCP tools end to end, on local (bubblewrap) and docker: the agent, through litellm to the
scripted model, calls a test server's tools over stdio and over streamable HTTP, and every call
and result is an event; a broken server is an error event and the task still finishes.

The stdio server (tests/mcp_servers/probe_server.py, written with the mcp SDK) is a command the
user chose: it must run inside the sandbox, so its `where` tool reports its pid namespace,
hostname and cgroup, which must be the sandbox's and not the host's. The HTTP server runs on the
host and is reached from inside the sandbox: with the sandbox's network "none" it is not reached
at all. The config's secrets (the HTTP server's bearer key, an env value the server echoes back)
must appear in no event, response or file of the data dir.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from .conftest import Stack, running_stack
from .public_api import events_until_final, open_events_ws, rest_events_when_projected

pytestmark = pytest.mark.slow

PROBE = Path(__file__).parent / "mcp_servers" / "probe_server.py"
ENV_SECRET = "tb-mcp-env-" + uuid.uuid4().hex
API_KEY = "tb-mcp-key-" + uuid.uuid4().hex


def _docker_bridge_gateway() -> str | None:
    """The host's address on docker's default bridge (where containers reach the host)."""
    try:
        client = docker.from_env()
        client.images.get("taskbus-sandbox:latest")
        config = client.networks.get("bridge").attrs["IPAM"]["Config"]
    except docker.errors.DockerException:
        return None
    if not config:
        return None
    # An engine may leave the default bridge's gateway unnamed (seen with Docker 28 after a
    # reload): it is then the subnet's first address, as docker0 carries it.
    return str(config[0].get("Gateway") or ipaddress.ip_network(config[0]["Subnet"])[1])


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"name": tool, "arguments": arguments}


def _script(http_host: str) -> dict[str, Any]:
    """The stdio probe's tools, then the HTTP one's with `finish` in the same answer: where the
    HTTP server is not offered (broken, no network) its call is refused and the agent goes on
    to finish."""
    remote = http_host.replace(".", "_")
    return {
        "steps": [
            {"tool_calls": [_call("probe_add", a=20, b=22)]},
            {"tool_calls": [_call("probe_where")]},
            {"tool_calls": [_call("probe_echo_env", name="PROBE_TOKEN")]},
            {
                "tool_calls": [
                    _call(f"{remote}_add", a=1000, b=337),
                    _call("finish", message="Used the MCP tools."),
                ]
            },
        ]
    }


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mcp SDK for the host's Debian python3, as the local backend's sandbox toolbox."""
    target = tmp_path_factory.mktemp("toolbox")
    subprocess.run(
        [
            "uv",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            "--python",
            "/usr/bin/python3",
            f"mcp=={version('mcp')}",
        ],
        check=True,
        timeout=300,
    )
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    return target


@pytest.fixture(scope="module", params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(backend, the address sandboxes reach the host's HTTP MCP server at)."""
    if request.param == "local":  # bubblewrap with the network shares the host's
        yield "local", "127.0.0.1"
        return
    gateway = _docker_bridge_gateway()
    if gateway is None:
        pytest.skip("no Docker engine with the sandbox image and a bridge network")
    yield "docker", gateway


@pytest.fixture(scope="module")
def http_server(backend: tuple[str, str]) -> Iterator[str]:
    """The probe over streamable HTTP on the host, requiring the bearer API_KEY."""
    host = backend[1]
    port = _free_port(host)
    process = subprocess.Popen(
        [sys.executable, str(PROBE), "--http", host, str(port)],
        env={**os.environ, "PROBE_API_KEY": API_KEY},
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                break
        assert process.poll() is None and time.monotonic() < deadline, "the HTTP server is down"
        time.sleep(0.2)
    yield f"http://{host}:{port}/mcp"
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def stack(
    backend: tuple[str, str],
    toolbox: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    name, host = backend
    with running_stack(
        tmp_path_factory.mktemp(f"mcp-{name}"),
        _script(host),
        TASKBUS_BACKEND=name,
        TASKBUS_SANDBOX_TOOLBOX=str(toolbox),
        TASKBUS_MCP_START_SECONDS="60",
    ) as running:
        yield running


def _stdio_probe() -> dict[str, Any]:
    """The probe as a stdio server: its source inline, so the sandbox needs no file of ours."""
    return {
        "name": "probe",
        "command": "python3",
        "args": ["-c", PROBE.read_text()],
        "env": {"PROBE_TOKEN": ENV_SECRET},
    }


async def _run(api: httpx.AsyncClient, stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = await api.post("/api/conversations", json={"initial_user_msg": "Use MCP.", **body})
    assert response.status_code == 201, response.text
    cid = response.json()["conversation_id"]
    async with open_events_ws(stack, cid, after_id=-1) as ws:
        events = await events_until_final(ws)
    assert events[-1]["status"] == "FINISHED", events[-1]
    return events


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == kind]


def _errors(events: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [e for e in _of(events, "ErrorObservation") if e["extras"]["error_id"] == code]


async def test_the_agent_calls_stdio_and_http_tools_run_in_the_sandbox(
    backend: tuple[str, str], stack: Stack, http_server: str
) -> None:
    name, host = backend
    remote = host.replace(".", "_")
    async with stack.client() as api:
        # The servers as the user's default: the conversation names none.
        config = {
            "stdio_servers": [_stdio_probe()],
            "shttp_servers": [{"url": http_server, "api_key": API_KEY}],
        }
        stored = await api.put("/api/settings", json={"mcp_config": config})
        assert stored.status_code == 200, stored.text
        events = await _run(api, stack, {})
        cid = events[0]["conversation_id"]

        (listed,) = _of(events, "MCPToolsListed")
        offered = {tool["name"]: tool for tool in listed["tools"]}
        assert {"probe_add", "probe_where", "probe_echo_env", f"{remote}_add"} <= set(offered)
        assert offered["probe_add"]["input_schema"]["required"] == ["a", "b"]
        ready = next(
            e for e in events if e["kind"] == "RuntimeStatusChanged" and e["status"] == "ready"
        )
        assert ready["backend"] == name and listed["id"] < ready["id"]  # offered from the start
        assert not _of(events, "ErrorObservation"), _of(events, "ErrorObservation")

        # Each call is an MCPAction answered by its MCPObservation with the real result.
        calls = {e["id"]: e for e in _of(events, "MCPAction")}
        results = {e["cause"]: e for e in _of(events, "MCPObservation")}
        assert set(results) == set(calls)
        by_tool = {calls[cause]["args"]["name"]: result for cause, result in results.items()}
        assert by_tool["probe_add"]["content"] == "42"
        assert by_tool[f"{remote}_add"]["content"] == "1337"  # over HTTP, with the bearer key
        # The server got the secret; the log shows it masked.
        assert by_tool["probe_echo_env"]["content"] == "<secret_hidden>"

        # The stdio server ran inside the sandbox (its pid namespace, its host name), unprivileged.
        where = json.loads(by_tool["probe_where"]["content"])
        assert where["pid_ns"] != os.readlink("/proc/self/ns/pid")
        if name == "local":
            assert where["hostname"] == "sandbox"
        else:
            container = docker.from_env().containers.get(ready["sandbox_id"])
            assert where["hostname"] == container.attrs["Config"]["Hostname"]
            assert where["hostname"] != socket.gethostname()
        assert where["uid"] != 0

        # The same through GET /events.
        rest = await rest_events_when_projected(api, cid, events[-1]["id"] + 1)
        assert [e["kind"] for e in rest[: len(events)]] == [e["kind"] for e in events]


async def test_a_broken_server_is_an_error_and_the_task_still_finishes(
    stack: Stack, http_server: str
) -> None:
    async with stack.client() as api:
        events = await _run(
            api,
            stack,
            {
                "mcp_config": {
                    "stdio_servers": [
                        _stdio_probe(),
                        {"name": "ghost", "command": "no-such-mcp-server"},
                    ],
                    "shttp_servers": ["http://127.0.0.1:1/mcp"],
                }
            },
        )
    failed = _errors(events, "mcp_server_failed")
    assert len(failed) == 2, failed
    assert any("ghost" in e["content"] for e in failed)
    assert any("cannot connect" in e["content"] for e in failed)
    (listed,) = _of(events, "MCPToolsListed")
    assert {tool["server"] for tool in listed["tools"]} == {"probe"}
    assert len(_of(events, "MCPObservation")) == 3  # the working server still serves
    # The model still calls the unreachable server's tool: refused as unknown; it goes on.
    assert len(_errors(events, "invalid_tool_call")) == 1
    assert _of(events, "AgentFinishAction")


async def test_a_sandbox_without_network_reaches_no_remote_server(
    stack: Stack, http_server: str
) -> None:
    async with stack.client() as api:
        events = await _run(
            api,
            stack,
            {
                "mcp_config": {
                    "stdio_servers": [_stdio_probe()],
                    "shttp_servers": [{"url": http_server, "api_key": API_KEY}],
                },
                "resources": {"network": "none"},
            },
        )
    (failed,) = _errors(events, "mcp_server_failed")
    assert "from inside the sandbox" in failed["content"], failed
    (listed,) = _of(events, "MCPToolsListed")
    assert {tool["server"] for tool in listed["tools"]} == {"probe"}  # stdio needs no network
    assert len(_errors(events, "invalid_tool_call")) == 1


async def test_mcp_secrets_appear_in_no_event_response_or_file(stack: Stack) -> None:
    """Runs last in the module: by then the conversations above have used both secrets."""
    async with stack.client() as api:
        settings = await api.get("/api/settings")
        assert settings.status_code == 200
        shown = settings.text
        assert "sealed:v1:" in shown  # the config is there, its secrets only as tokens
        listed = (await api.get("/api/conversations")).json()["results"]
        responses = [shown, json.dumps(listed)]
        for conversation in listed:
            cid = conversation["conversation_id"]
            responses.append((await api.get(f"/api/conversations/{cid}")).text)
            page = await api.get(f"/api/conversations/{cid}/events", params={"limit": 100})
            responses.append(page.text)
    for text in responses:
        assert ENV_SECRET not in text and API_KEY not in text
    for path in stack.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert ENV_SECRET.encode() not in data, path
            assert API_KEY.encode() not in data, path
