"""An MCP server for the tests, written with the mcp SDK: it adds numbers and says where it runs.

`python probe_server.py` serves over stdio; `python probe_server.py --http HOST PORT` serves
streamable HTTP at /mcp, answering only requests that carry `Authorization: Bearer
$PROBE_API_KEY` when that variable is set. `where` reports the process' pid namespace, hostname
and cgroup, so a test can tell the sandbox from the host; `echo_env` hands an environment
variable back, as a careless server would hand back a secret.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("probe")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
def where() -> str:
    """Where this server runs: pid namespace, hostname, cgroup, uid."""
    return json.dumps(
        {
            "pid_ns": os.readlink("/proc/self/ns/pid"),
            "hostname": socket.gethostname(),
            "cgroup": Path("/proc/self/cgroup").read_text().strip(),
            "uid": os.getuid(),
        }
    )


@server.tool()
def echo_env(name: str) -> str:
    """The value of an environment variable of the server."""
    return os.environ.get(name, "")


@server.tool()
def fail(message: str) -> str:
    """Always fails with `message`."""
    raise ValueError(message)


def bearer_only(app: Any, key: str) -> Any:
    """`app`, answering 401 to any HTTP request without the bearer key."""

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] == "http" and headers.get(b"authorization") != f"Bearer {key}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    if sys.argv[1:2] != ["--http"]:
        server.run()
        return
    import uvicorn

    host, port = sys.argv[2], int(sys.argv[3])
    app = server.streamable_http_app(
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host=host,
    )
    key = os.environ.get("PROBE_API_KEY")
    uvicorn.run(bearer_only(app, key) if key else app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
