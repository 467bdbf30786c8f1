"""`mcp_config` as the gateway takes it (a conversation's, or a user's default in settings): its
secrets sealed before the config leaves the gateway, its URLs free of credentials.

A remote server's `api_key` and a stdio server's `env` values are sealed with the secrets key,
bound to the user (`mcp_secret_context`), so the log, the settings bucket and every response
hold only `sealed:v1:` tokens; the runner opens them inside the sandbox's start. A value that is
already a token (a client posting back the settings it read) must open as this user's, so
nobody can plant another user's token. The shape itself is msgspec's to check (422 naming the
field); the sealed config must still fit its limits (a token is longer than its value).
"""

from __future__ import annotations

import msgspec

from taskbus.contracts.redaction import repository_credential
from taskbus.contracts.secret_box import SecretBox, SecretError, is_sealed, mcp_secret_context
from taskbus.contracts.specs import MAX_SECRET_CHARS, MCPConfig, MCPRemoteServer, MCPStdioServer
from taskbus.gateway.problems import Problem


def _invalid(detail: str) -> Problem:
    return Problem(422, detail, kind="validation-error", title="Invalid mcp_config")


class _Sealer:
    def __init__(self, user_id: str, box: SecretBox | None) -> None:
        self._context = mcp_secret_context(user_id)
        self._box = box

    def seal(self, value: str, field: str) -> str:
        if self._box is None:
            raise Problem(
                422,
                f"mcp_config.{field}: this server stores no secrets: it has no secrets key to "
                "encrypt them with (TASKBUS_SECRETS_KEY_FILE)",
                kind="secrets-unavailable",
                title="MCP secrets cannot be stored",
            )
        if is_sealed(value):
            try:
                self._box.open(value, self._context)
            except SecretError:
                raise _invalid(f"mcp_config.{field} is a sealed value that is not yours") from None
            return value
        if len(value) > MAX_SECRET_CHARS:
            raise _invalid(f"mcp_config.{field} is longer than {MAX_SECRET_CHARS} characters")
        return self._box.seal(value, self._context)


def _checked_url(url: str, field: str) -> str:
    if not url.lower().startswith(("http://", "https://")):
        raise _invalid(f"mcp_config.{field} must be an http or https URL")
    reason = repository_credential(url)
    if reason is not None:
        reason = reason.replace("a repository URL", "a server URL")
        raise _invalid(f"mcp_config.{field}: {reason}; give a key as api_key")
    return url


def sealed_mcp_config(
    config: MCPConfig | None, user_id: str, box: SecretBox | None
) -> MCPConfig | None:
    """`config` with its secrets sealed for `user_id`, or a 422 Problem."""
    if config is None:
        return None
    sealer = _Sealer(user_id, box)

    def remote(server: str | MCPRemoteServer, field: str) -> str | MCPRemoteServer:
        if isinstance(server, str):
            return _checked_url(server, field)
        _checked_url(server.url, f"{field}.url")
        if server.api_key is None:
            return server
        return msgspec.structs.replace(
            server, api_key=sealer.seal(server.api_key, f"{field}.api_key")
        )

    def stdio(server: MCPStdioServer, field: str) -> MCPStdioServer:
        env = {key: sealer.seal(value, f"{field}.env.{key}") for key, value in server.env.items()}
        return msgspec.structs.replace(server, env=env)

    sealed = {
        "sse_servers": [
            remote(server, f"sse_servers[{i}]") for i, server in enumerate(config.sse_servers)
        ],
        "shttp_servers": [
            remote(server, f"shttp_servers[{i}]") for i, server in enumerate(config.shttp_servers)
        ],
        "stdio_servers": [
            stdio(server, f"stdio_servers[{i}]") for i, server in enumerate(config.stdio_servers)
        ],
    }
    try:  # the limits again, now on the tokens
        return msgspec.convert(msgspec.to_builtins(sealed), MCPConfig)
    except msgspec.ValidationError as error:
        raise _invalid(f"mcp_config, once its secrets are sealed: {error}") from None
