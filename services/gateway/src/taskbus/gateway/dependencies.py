"""FastAPI dependencies: the caller's identity, the process-wide NATS bus and the box that
seals what users entrust to the server.

Every dependency is `async def`, cheap as most are: FastAPI runs a plain `def` dependency in its
thread pool, which cost each request on the hot path three round trips to a worker thread (two
thread switches each, a wait for the CPU each on a busy machine)."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection, Request

from taskbus.contracts.secret_box import SecretBox
from taskbus.gateway.auth import ApiKeys
from taskbus.gateway.bus import Bus
from taskbus.gateway.limits import ConnectionLimiter, RateLimiter
from taskbus.gateway.problems import Problem, unauthorized
from taskbus.gateway.settings import GatewaySettings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


async def get_bus(connection: HTTPConnection) -> Bus:
    return cast(Bus, connection.app.state.bus)


async def get_api_keys(connection: HTTPConnection) -> ApiKeys:
    return cast(ApiKeys, connection.app.state.api_keys)


async def get_settings(connection: HTTPConnection) -> GatewaySettings:
    return cast(GatewaySettings, connection.app.state.settings)


async def get_create_rate(connection: HTTPConnection) -> RateLimiter:
    return cast(RateLimiter, connection.app.state.create_rate)


async def get_websocket_limit(connection: HTTPConnection) -> ConnectionLimiter:
    return cast(ConnectionLimiter, connection.app.state.websocket_limit)


async def current_user(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_keys: Annotated[ApiKeys, Depends(get_api_keys)],
) -> str:
    """The user the bearer key belongs to; 401 problem otherwise."""
    user = api_keys.user_for_key(credentials.credentials) if credentials else None
    if user is None:
        raise unauthorized()
    return user


UserId = Annotated[str, Depends(current_user)]
BusDep = Annotated[Bus, Depends(get_bus)]
SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
CreateRateDep = Annotated[RateLimiter, Depends(get_create_rate)]
WebSocketLimitDep = Annotated[ConnectionLimiter, Depends(get_websocket_limit)]


def sealing_box(request: Request, cannot: str, title: str) -> SecretBox:
    """The box that seals what users entrust to the server (secrets, webhook signing keys), or
    a 422 saying the server `cannot` do it without a secrets key."""
    box: SecretBox | None = request.app.state.settings_policy.box
    if box is None:
        raise Problem(
            422,
            f"this server {cannot}: it has no secrets key (TASKBUS_SECRETS_KEY_FILE)",
            kind="secrets-unavailable",
            title=title,
        )
    return box
