"""What every conversation's MCP servers share, and the door to them.

The mcp SDK (with its generated protocol types, about 26 MB and a second of import) is loaded by
the first conversation that configures a server (`mcp_tools`), not by every runner at start:
most conversations use none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskbus.contracts.events import RuntimeRequested
from taskbus.contracts.secret_box import SecretBox
from taskbus.runtime_runner.sandbox import Sandbox

if TYPE_CHECKING:
    from taskbus.runtime_runner.mcp_tools import ConversationMCP


class MCPLimits:
    def __init__(self, start_seconds: float, call_seconds: float, max_output_bytes: int) -> None:
        self.start_seconds = start_seconds
        self.call_seconds = call_seconds
        self.max_output_bytes = max_output_bytes


class MCPClients:
    """The key that opens the servers' secrets, and their limits."""

    def __init__(self, box: SecretBox | None, limits: MCPLimits) -> None:
        self._box = box
        self._limits = limits

    def for_sandbox(self, request: RuntimeRequested, sandbox: Sandbox) -> ConversationMCP | None:
        """The conversation's servers, or None when it names none."""
        config = request.mcp_config
        if config is None or not (
            config.stdio_servers or config.shttp_servers or config.sse_servers
        ):
            return None
        from taskbus.runtime_runner.mcp_tools import ConversationMCP

        return ConversationMCP(config, sandbox, request.user_id, self._box, self._limits)
