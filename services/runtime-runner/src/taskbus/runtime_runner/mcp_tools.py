"""A conversation's MCP servers, run or reached from inside its sandbox, through the mcp SDK.

A stdio server is a command the user chose: it runs in the sandbox (`Sandbox.spawn_process`),
confined as the agent's own shell, and the SDK's `ClientSession` speaks to it over that process'
stdin and stdout. A remote server (streamable HTTP or SSE) is reached through a relay the sandbox
runs (`bash`'s /dev/tcp, one per TCP connection) handed to the SDK's HTTP client as its network,
so the sandbox's network policy applies to MCP exactly as to its commands: a sandbox without a
network reaches no server. TLS runs here, over the relayed bytes.

Secrets in the config (a remote server's `api_key`, a stdio server's `env` values) arrive sealed
(contracts/secret_box.py) and are opened only to start the server; they are masked out of every
text this module writes into the log.

Each server's session lives in a task of its own (the SDK's anyio task groups must be left in
the task that entered them); calls come from the conversation's lane. After a runner restart the
servers are started again, lazily, on the first call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httpcore2
import httpx2
import mcp_types
from httpcore2._backends.anyio import AnyIOStream
from mcp.client import ClientSession
from mcp.client._transport import TransportStreams
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from taskbus.contracts.events import (
    ErrorObservation,
    Event,
    MCPAction,
    MCPObservation,
    MCPTool,
    MCPToolsListed,
    RuntimeRequested,
)
from taskbus.contracts.secret_box import SecretBox, SecretError, mcp_secret_context
from taskbus.contracts.specs import MCPConfig, MCPRemoteServer, MCPStdioServer
from taskbus.runtime_runner.files import reply_to
from taskbus.runtime_runner.masking import mask_text
from taskbus.runtime_runner.output import OutputCap
from taskbus.runtime_runner.sandbox import Sandbox, SandboxProcess

if TYPE_CHECKING:
    from taskbus.runtime_runner.mcp_clients import MCPLimits

logger = logging.getLogger(__name__)

MAX_TOOL_NAME = 64
# The agent's built-in tools (session-manager's tools.py): an MCP tool never takes their names.
RESERVED_NAMES = frozenset(
    {"execute_bash", "str_replace_editor", "task_tracker", "think", "finish"}
)
# Opens a TCP connection from inside the sandbox, says so with one byte, then relays.
_RELAY = ["bash", "-c", 'exec 3<>"/dev/tcp/$0/$1" || exit 1; printf C; cat <&3 & exec cat >&3']
_MAX_LINE_BYTES = 16 * 1024 * 1024
_CLOSE_SECONDS = 5.0
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]+")


# --- naming (pure) ------------------------------------------------------------------------------


def tool_name(server: str, tool: str, taken: set[str]) -> str:
    """`<server>_<tool>` as the LLM may call it (`[A-Za-z0-9_-]{1,64}`), unique among `taken`."""
    base = _NOT_ALLOWED.sub("_", f"{server}_{tool}").strip("_")[:MAX_TOOL_NAME] or "tool"
    name, number = base, 1
    while name in taken:
        number += 1
        suffix = f"_{number}"
        name = base[: MAX_TOOL_NAME - len(suffix)] + suffix
    taken.add(name)
    return name


def masked(text: str, secrets: Iterable[str]) -> str:
    """`text` with the servers' secrets masked as the sandbox secrets are (masking.py)."""
    return mask_text(text, sorted((value for value in secrets if value), key=len, reverse=True))


def result_text(result: mcp_types.CallToolResult, limit: int) -> str:
    """What a tool answered, as text: its text blocks, other blocks named, capped."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            parts.append(f"[{block.type}: {block.mime_type}]")
        else:
            parts.append(f"[{block.type}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    cap = OutputCap(limit)
    cap.append("\n".join(parts).encode())
    return cap.text()


def describe(error: BaseException) -> str:
    """The innermost cause of a failure (anyio wraps them in exception groups)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = str(error) or type(error).__name__
    return text if isinstance(error, McpUnavailable) else f"{type(error).__name__}: {text}"


class McpUnavailable(Exception):
    """A server that cannot be used (its secrets do not open, it is not running)."""


# --- transports over sandbox processes ------------------------------------------------------------


@contextlib.asynccontextmanager
async def process_transport(process: SandboxProcess) -> AsyncIterator[TransportStreams]:
    """The SDK's message streams over a process' stdin and stdout (newline-delimited JSON-RPC,
    as `mcp.client.stdio`); the process is killed when the block ends."""
    reader_in, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, writer_out = anyio.create_memory_object_stream[SessionMessage](0)

    async def stdout_reader() -> None:
        buffer = b""
        async with reader_in:
            while data := await process.read():
                *lines, buffer = (buffer + data).split(b"\n")
                if len(buffer) > _MAX_LINE_BYTES:
                    await reader_in.send(ValueError("the server wrote an overlong line"))
                    return
                for line in lines:
                    if line.strip():
                        await reader_in.send(_parse(line))

    async def stdin_writer() -> None:
        async with writer_out:
            async for message in writer_out:
                text = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                await process.write(text.encode() + b"\n")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stdout_reader)
        tasks.start_soon(stdin_writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                await process.terminate()
            tasks.cancel_scope.cancel()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line))
    except ValueError as error:
        return error


class RelayStream(anyio.abc.ByteStream):
    """A TCP connection made inside the sandbox, as the bytes of its relay process."""

    def __init__(self, process: SandboxProcess) -> None:
        self._process = process
        self._pending = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._process.read()
            if not self._pending:
                raise anyio.EndOfStream
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        await self._process.write(item)

    async def send_eof(self) -> None:
        raise NotImplementedError("the relay cannot half-close")

    async def aclose(self) -> None:
        await self._process.terminate()


class SandboxNetwork(httpcore2.AsyncNetworkBackend):
    """httpcore's network, as seen from inside the sandbox: each connection is a relay."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        process = await self._sandbox.spawn_process([*_RELAY, host, str(port)], {})
        stream = RelayStream(process)
        try:
            with anyio.fail_after(timeout):
                connected = await stream.receive(1)
        except (TimeoutError, anyio.EndOfStream):
            connected = b""
        if connected != b"C":
            await stream.aclose()
            raise httpcore2.ConnectError(
                f"cannot connect to {host}:{port} from inside the sandbox"
                + (f" ({tail})" if (tail := process.stderr_tail()) else "")
            )
        return AnyIOStream(stream)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class SandboxTransport(httpx2.AsyncHTTPTransport):
    """httpx's transport over `SandboxNetwork` (TLS verified here, over the relayed bytes)."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            network_backend=SandboxNetwork(sandbox),
        )


def _sandbox_client_factory(sandbox: Sandbox) -> Callable[..., httpx2.AsyncClient]:
    def client(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            transport=SandboxTransport(sandbox),
            headers=headers,
            timeout=timeout or httpx2.Timeout(30.0, read=300.0),
            auth=auth,
            trust_env=False,
        )

    return client


@contextlib.asynccontextmanager
async def remote_transport(
    sandbox: Sandbox, url: str, streamable: bool, headers: dict[str, str]
) -> AsyncIterator[TransportStreams]:
    new_client = _sandbox_client_factory(sandbox)
    if streamable:
        async with (
            new_client(headers=headers) as client,
            streamable_http_client(url, http_client=client) as streams,
        ):
            yield streams
    else:
        async with sse_client(url, headers=headers, httpx_client_factory=new_client) as streams:
            yield streams


# --- servers ------------------------------------------------------------------------------------


# Opens the transport of a server (a stdio server's connect records its process on the server).
Connect = Callable[["_Server"], AbstractAsyncContextManager[TransportStreams]]


class _Server:
    """One server's session, held open by a task of its own until `close`."""

    def __init__(self, name: str, connect: Connect) -> None:
        self.name = name
        self._connect = connect
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: ClientSession | None = None
        self.process: SandboxProcess | None = None  # a stdio server's, for its stderr

    async def open(self, seconds: float) -> list[mcp_types.Tool]:
        ready: asyncio.Future[list[mcp_types.Tool]] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(ready))
        try:
            return await asyncio.wait_for(asyncio.shield(ready), seconds)
        except TimeoutError:
            raise McpUnavailable(f"the server did not answer within {seconds:g} s") from None
        finally:
            if not ready.done():
                ready.cancel()

    async def _serve(self, ready: asyncio.Future[list[mcp_types.Tool]]) -> None:
        try:
            async with (
                self._connect(self) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                tools: list[mcp_types.Tool] = []
                cursor: str | None = None
                while True:
                    params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    listed = await session.list_tools(params=params)
                    tools += listed.tools
                    if not (cursor := listed.next_cursor):
                        break
                self._session = session
                if not ready.done():
                    ready.set_result(tools)
                await self._stop.wait()
        except Exception as error:
            if not ready.done():
                ready.set_exception(error)
            else:
                logger.info("MCP server %s ended: %s", self.name, describe(error))
        finally:
            self._session = None

    async def call(
        self, tool: str, arguments: dict[str, Any], seconds: float
    ) -> mcp_types.CallToolResult:
        session = self._session
        if session is None:
            raise McpUnavailable(f"the MCP server {self.name} is not running")
        return await asyncio.wait_for(
            session.call_tool(tool, arguments, read_timeout_seconds=seconds), seconds + 1
        )

    def stderr_tail(self) -> str:
        return self.process.stderr_tail() if self.process is not None else ""

    async def close(self) -> None:
        self._stop.set()
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):  # then it is cancelled
            await asyncio.wait_for(self._task, _CLOSE_SECONDS)


class ConversationMCP:
    """The MCP servers of one conversation's sandbox: started with it, listed into the log,
    called by `MCPAction`, closed with it."""

    def __init__(
        self,
        config: MCPConfig,
        sandbox: Sandbox,
        user_id: str,
        box: SecretBox | None,
        limits: MCPLimits,
    ) -> None:
        self._config = config
        self._sandbox = sandbox
        self._user_id = user_id
        self._box = box
        self._limits = limits
        self._servers: list[_Server] = []
        self._tools: dict[str, tuple[_Server, MCPTool]] = {}
        self._call_seconds: dict[str, float] = {}
        self._secrets: set[str] = set()
        self._started: asyncio.Task[list[tuple[str, str]]] | None = None

    async def start(self, request: RuntimeRequested) -> list[Event]:
        """Start every server; `MCPToolsListed`, and an error event per server that failed."""
        failures = await self._start_once()
        tools = [tool for _, tool in self._tools.values()]
        return [
            MCPToolsListed(**reply_to(request), tools=tools),
            *(
                ErrorObservation(
                    **reply_to(request),
                    code="mcp_server_failed",
                    content=f"The MCP server {server} could not be used: {why}",
                )
                for server, why in failures
            ),
        ]

    async def _start_once(self) -> list[tuple[str, str]]:
        if self._started is None:
            self._started = asyncio.create_task(self._start_all())
        return await asyncio.shield(self._started)

    async def _start_all(self) -> list[tuple[str, str]]:
        servers: list[tuple[str, Connect | McpUnavailable, float]] = []
        config, call_seconds = self._config, self._limits.call_seconds
        for stdio in config.stdio_servers:
            servers.append((stdio.name, self._stdio(stdio), call_seconds))
        for streamable, remotes in ((True, config.shttp_servers), (False, config.sse_servers)):
            for remote in remotes:
                spec = (
                    remote if isinstance(remote, MCPRemoteServer) else MCPRemoteServer(url=remote)
                )
                name = urlsplit(spec.url).hostname or "remote"
                servers.append((name, self._remote(spec, streamable), spec.timeout or call_seconds))
        opened = await asyncio.gather(*(self._open(*server) for server in servers))
        taken = set(RESERVED_NAMES)
        failures: list[tuple[str, str]] = []
        for (name, _, seconds), outcome in zip(servers, opened, strict=True):
            if isinstance(outcome, str):
                failures.append((name, outcome))
                continue
            server, listed = outcome
            for tool in listed:
                offered = MCPTool(
                    server=name,
                    name=tool_name(name, tool.name, taken),
                    tool=tool.name,
                    description=tool.description or "",
                    input_schema=tool.input_schema,
                )
                self._tools[offered.name] = (server, offered)
                self._call_seconds[offered.name] = seconds
        return failures

    async def _open(
        self, name: str, connect: Connect | McpUnavailable, seconds: float
    ) -> tuple[_Server, list[mcp_types.Tool]] | str:
        """The open server and its tools, or why it failed (secrets masked)."""
        if isinstance(connect, McpUnavailable):
            return str(connect)
        server = _Server(name, connect)
        self._servers.append(server)
        try:
            return server, await server.open(self._limits.start_seconds)
        except Exception as error:
            await server.close()
            why = describe(error)
            if tail := server.stderr_tail():
                why += f"; its stderr ends with: {tail}"
            logger.info("MCP server %s failed: %s", name, masked(why, self._secrets))
            return masked(why, self._secrets)

    def _open_secret(self, token: str) -> str:
        if self._box is None:
            raise McpUnavailable("this runner has no secrets key to open the server's secrets")
        try:
            value = self._box.open(token, mcp_secret_context(self._user_id))
        except SecretError as error:
            raise McpUnavailable(f"its secrets do not open: {error}") from None
        self._secrets.add(value)
        return value

    def _stdio(self, server: MCPStdioServer) -> Connect | McpUnavailable:
        try:
            environment = {key: self._open_secret(token) for key, token in server.env.items()}
        except McpUnavailable as error:
            return error
        sandbox = self._sandbox

        @contextlib.asynccontextmanager
        async def connect(opened: _Server) -> AsyncIterator[TransportStreams]:
            process = await sandbox.spawn_process([server.command, *server.args], environment)
            opened.process = process
            async with process_transport(process) as streams:
                yield streams

        return connect

    def _remote(self, server: MCPRemoteServer, streamable: bool) -> Connect | McpUnavailable:
        headers: dict[str, str] = {}
        if server.api_key is not None:
            try:
                headers["Authorization"] = f"Bearer {self._open_secret(server.api_key)}"
            except McpUnavailable as error:
                return error
        return lambda _: remote_transport(self._sandbox, server.url, streamable, headers)

    async def call(self, action: MCPAction) -> Event:
        """The tool's answer, or the error event of a call that failed."""
        await self._start_once()  # after a runner restart: started again on the first call
        known = self._tools.get(action.name)
        if known is None:
            return self._failed(action, f"no MCP tool is named {action.name!r} in this sandbox")
        server, tool = known
        try:
            result = await server.call(tool.tool, action.arguments, self._call_seconds[tool.name])
        except TimeoutError:
            seconds = self._call_seconds[tool.name]
            return self._failed(action, f"the tool did not answer within {seconds:g} s")
        except Exception as error:
            return self._failed(action, describe(error))
        return MCPObservation(
            **reply_to(action),
            name=action.name,
            content=masked(result_text(result, self._limits.max_output_bytes), self._secrets),
            arguments=action.arguments,
            is_error=result.is_error,
        )

    def _failed(self, action: MCPAction, why: str) -> ErrorObservation:
        return ErrorObservation(
            **reply_to(action),
            code="mcp_call_failed",
            content=f"The MCP tool {action.name} failed: {masked(why, self._secrets)}",
        )

    async def close(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
        await asyncio.gather(*(server.close() for server in self._servers))
        self._servers.clear()
        self._tools.clear()
