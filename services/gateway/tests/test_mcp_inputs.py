"""`mcp_config`'s secrets are sealed for their user before the config leaves the gateway."""

from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts.secret_box import SecretBox, generate_key, is_sealed, mcp_secret_context
from taskbus.contracts.specs import MCPConfig, MCPRemoteServer, MCPStdioServer
from taskbus.gateway.mcp_inputs import sealed_mcp_config
from taskbus.gateway.problems import Problem

BOX = SecretBox(generate_key())
CONFIG = MCPConfig(
    shttp_servers=[
        "https://a.example/mcp",
        MCPRemoteServer(url="https://b.example/mcp", api_key="k1"),
    ],
    sse_servers=[MCPRemoteServer(url="https://c.example/sse")],
    stdio_servers=[MCPStdioServer(name="p", command="python3", args=["-m", "x"], env={"T": "v1"})],
)


def test_secrets_are_sealed_for_the_user_and_nothing_else_changes() -> None:
    sealed = sealed_mcp_config(CONFIG, "alice", BOX)
    assert sealed is not None
    remote = sealed.shttp_servers[1]
    assert isinstance(remote, MCPRemoteServer) and remote.api_key is not None
    env = sealed.stdio_servers[0].env["T"]
    assert is_sealed(remote.api_key) and is_sealed(env)
    assert BOX.open(remote.api_key, mcp_secret_context("alice")) == "k1"
    assert BOX.open(env, mcp_secret_context("alice")) == "v1"
    assert b"k1" not in msgspec.json.encode(sealed) and b'"v1"' not in msgspec.json.encode(sealed)
    unsealed = msgspec.structs.replace(
        sealed,
        shttp_servers=CONFIG.shttp_servers,
        stdio_servers=[msgspec.structs.replace(sealed.stdio_servers[0], env={"T": "v1"})],
    )
    assert unsealed == CONFIG
    # Posted back as read, a token of the user's own is kept; another user's is refused.
    assert sealed_mcp_config(sealed, "alice", BOX) == sealed
    with pytest.raises(Problem, match="not yours"):
        sealed_mcp_config(sealed, "mallory", BOX)


def test_without_a_secrets_key_a_config_with_secrets_is_refused() -> None:
    with pytest.raises(Problem, match="no secrets key") as refused:
        sealed_mcp_config(CONFIG, "alice", None)
    assert refused.value.status == 422
    plain = MCPConfig(shttp_servers=["https://a.example/mcp"])
    assert sealed_mcp_config(plain, "alice", None) == plain
    assert sealed_mcp_config(None, "alice", None) is None
