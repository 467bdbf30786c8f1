"""The runner's MCP plumbing on every backend: programs spawned in the sandbox are confined as
its shell (its pid namespace, its user), their stderr kept apart from the protocol on stdout;
the relay that carries a remote server's TCP connection runs inside the sandbox, so the
sandbox's network policy holds for it. And the pure parts: tool names, masking, results."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpcore2
import mcp_types
import pytest

from taskbus.contracts.specs import NetworkMode
from taskbus.runtime_runner.limits import SandboxResources
from taskbus.runtime_runner.mcp_tools import (
    MAX_TOOL_NAME,
    RESERVED_NAMES,
    SandboxNetwork,
    masked,
    result_text,
    tool_name,
)
from taskbus.runtime_runner.sandbox import Sandbox, SandboxProcess

from .conftest import TEST_RESOURCES, SandboxMaker


async def _output(process: SandboxProcess) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(process.read(), 20):
        data += chunk
    return data


async def test_a_spawned_program_runs_confined_with_stderr_apart(sandbox: Sandbox) -> None:
    process = await sandbox.spawn_process(
        ["bash", "-c", 'echo "$GREETING $(readlink /proc/self/ns/pid) $(id -u)"; echo oops >&2'],
        {"GREETING": "hello"},
    )
    greeting, namespace, uid = (await _output(process)).decode().split()
    await process.terminate()
    assert greeting == "hello"
    assert namespace != os.readlink("/proc/self/ns/pid")
    assert uid != "0"
    assert process.stderr_tail() == "oops"


async def test_a_program_that_does_not_exist_says_so_on_stderr(sandbox: Sandbox) -> None:
    process = await sandbox.spawn_process(["no-such-program-here"], {})
    assert await _output(process) == b""
    await process.terminate()
    assert "no-such-program-here" in process.stderr_tail()


async def test_a_program_is_killed_with_what_it_started(sandbox: Sandbox) -> None:
    process = await sandbox.spawn_process(["bash", "-c", "sleep 300 & echo started; wait"], {})
    assert await asyncio.wait_for(process.read(), 20) == b"started\n"
    await asyncio.wait_for(process.terminate(), 20)
    outcome = await asyncio.wait_for(_output(process), 20)
    assert outcome == b""


@pytest.fixture
def host_listener() -> Iterator[tuple[str, int]]:
    """A TCP listener on all the host's addresses, answering 'hi' to each connection."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(30)
    yield "127.0.0.1", server.getsockname()[1]
    server.close()


async def test_the_relay_connects_from_inside_the_sandbox_only_where_it_has_a_network(
    make_sandbox: SandboxMaker, host_listener: tuple[str, int]
) -> None:
    host, port = host_listener
    isolated = await make_sandbox(resources=TEST_RESOURCES)  # network "none"
    with pytest.raises(httpcore2.ConnectError, match="from inside the sandbox"):
        await SandboxNetwork(isolated).connect_tcp(host, port, timeout=20)
    if isolated.backend == "docker":
        return  # a bridged container reaches the host at its gateway, not at 127.0.0.1
    networked = await make_sandbox(
        resources=SandboxResources(cpus=1, memory_mb=512, pids=256, network=NetworkMode.BRIDGE)
    )
    stream = await SandboxNetwork(networked).connect_tcp(host, port, timeout=20)
    await stream.write(b"ping")
    await stream.aclose()


def test_tool_names_are_sanitised_unique_and_never_a_built_in() -> None:
    taken = set(RESERVED_NAMES)
    assert tool_name("probe", "add", taken) == "probe_add"
    assert tool_name("probe", "add", taken) == "probe_add_2"
    assert tool_name("127.0.0.1", "a b/c", taken) == "127_0_0_1_a_b_c"
    assert tool_name("execute", "bash", taken) == "execute_bash_2"
    long = tool_name("s" * 40, "t" * 40, taken)
    assert len(long) == MAX_TOOL_NAME
    assert len(tool_name("s" * 40, "t" * 40, taken)) == MAX_TOOL_NAME
    assert all(name.replace("_", "").replace("-", "").isalnum() for name in taken)


def test_secrets_are_masked_and_results_capped() -> None:
    hidden = "key=<secret_hidden> and <secret_hidden>"
    assert masked("key=abc123 and abc123", ["abc123", ""]) == hidden
    result = mcp_types.CallToolResult(
        content=[
            mcp_types.TextContent(text="x" * 5000),
            mcp_types.ImageContent(data="AAAA", mime_type="image/png"),
        ]
    )
    text = result_text(result, 1024)
    assert len(text) < 1200 and "omitted" in text
    structured = mcp_types.CallToolResult(content=[], structured_content={"sum": 3})
    assert result_text(structured, 1024) == '{"sum": 3}'


def test_a_runner_loads_the_mcp_sdk_only_for_a_conversation_with_servers() -> None:
    """The SDK is ~26 MB of a runner's idle memory: `mcp_clients` imports it on demand."""
    probe = (
        "import sys, taskbus.runtime_runner.app;"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('mcp', 'mcp_types')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert loaded.stdout.strip() == "[]"
