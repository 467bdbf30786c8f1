"""The user's secrets: custom secrets and git provider tokens, at OpenHands' routes and shapes
(openhands/server/routes/secrets.py). Values are write-only: the gateway seals each one for its
user and name (contracts/user_secrets.py) before it enters NATS, lists names only, and answers
a write once session-manager has stored it (read-your-writes, as for settings)."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from fastapi import APIRouter, Path, Request, Response

from taskbus.contracts.commands import (
    DeleteSecret,
    SecretsCommand,
    SecretsTooMany,
    StoreProviderTokens,
    StoreSecret,
    UnsetProviderTokens,
)
from taskbus.contracts.git_providers import TokenHost
from taskbus.contracts.secret_box import SecretBox, SecretError
from taskbus.contracts.specs import MAX_SECRET_CHARS, GitProvider
from taskbus.contracts.user_secrets import (
    MAX_CUSTOM_SECRETS,
    MAX_SECRET_VALUE_BYTES,
    SECRET_NAME_PATTERN,
    CustomSecret,
    Description,
    ProviderTokenUpdate,
    SecretName,
    UserSecrets,
    custom_secret_context,
    name_problem,
    provider_token_context,
)
from taskbus.gateway.bus import Bus
from taskbus.gateway.dependencies import BusDep, UserId, sealing_box
from taskbus.gateway.problems import Problem
from taskbus.gateway.rest import json_response, typed_body

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

SecretValue = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_VALUE_BYTES)]
# A token is what git sends as a password: printable ASCII, no space (nothing that could end a
# line of git's credential protocol).
Token = Annotated[str, msgspec.Meta(max_length=MAX_SECRET_CHARS, pattern=r"^[\x21-\x7e]*$")]
SecretId = Annotated[str, Path(description="The secret's name.", pattern=SECRET_NAME_PATTERN)]


class SecretBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/secrets: OpenHands' CustomSecretModel, and whether the sandbox sees it."""

    name: SecretName
    value: SecretValue
    description: Description | None = None
    expose_in_sandbox: bool = True


class SecretUpdateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """PUT /api/secrets/{secret_id}: OpenHands' CustomSecretWithoutValueModel (a new name and
    description); Taskbus also takes a new `value` and `expose_in_sandbox` (absent: kept)."""

    name: SecretName
    description: Description | None = None
    value: SecretValue | None = None
    expose_in_sandbox: bool | None = None


class SecretView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    expose_in_sandbox: bool


class SecretList(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/secrets: OpenHands' GETCustomSecrets (names and descriptions, never values)."""

    custom_secrets: list[SecretView]


class ProviderTokenBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenHands' ProviderToken: an absent or empty token keeps the stored one."""

    token: Token | None = None
    host: TokenHost | None = None
    # OpenHands' provider-side user id: accepted, unused.
    user_id: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class ProviderTokensBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/add-git-providers: OpenHands' POSTProviderModel."""

    provider_tokens: dict[GitProvider, ProviderTokenBody] = {}


class SecretsMessage(msgspec.Struct, frozen=True, kw_only=True):
    """OpenHands' answer to a secrets write."""

    message: str


def _invalid(detail: str) -> Problem:
    return Problem(422, detail, kind="validation-error", title="Invalid secret")


def _box(request: Request) -> SecretBox:
    return sealing_box(request, "stores no secrets", "Secrets cannot be stored")


def _checked_name(name: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise _invalid(problem)
    return name


def _checked_value(value: str) -> str:
    """A value an environment variable can hold, within the size the bucket is sized for."""
    if "\x00" in value:
        raise _invalid("a secret's value may not contain a NUL character")
    if len(value.encode()) > MAX_SECRET_VALUE_BYTES:
        raise _invalid(f"a secret's value is at most {MAX_SECRET_VALUE_BYTES} bytes (UTF-8)")
    return value


async def _store(bus: Bus, command: SecretsCommand) -> None:
    """Send `command` to session-manager and wait until the entry shows it: applying it again
    would change nothing. 504 past the timeout."""

    async def stored() -> UserSecrets | None:
        secrets = await bus.user_secrets(command.user_id)
        try:
            return secrets if command.applied_to(secrets) == secrets else None
        except SecretsTooMany:
            return None  # another write filled the list meanwhile: session-manager drops this one

    await bus.publish_until_stored(
        command, stored, "the change was sent but is not stored yet; list the secrets to see it"
    )


# --- custom secrets ---------------------------------------------------------------------------


@router.get("/secrets", summary="Your custom secrets' names (never their values)")
async def list_secrets(user: UserId, bus: BusDep) -> Response:
    """Names, descriptions and whether each is exposed to your sandboxes."""
    stored = await bus.user_secrets(user)
    views = [
        SecretView(
            name=name, description=secret.description, expose_in_sandbox=secret.expose_in_sandbox
        )
        for name, secret in sorted(stored.custom_secrets.items())
    ]
    return json_response(SecretList(custom_secrets=views))


@router.post("/secrets", status_code=201, summary="Create a custom secret")
async def create_secret(request: Request, user: UserId, bus: BusDep) -> Response:
    """Body: `{name, value, description, expose_in_sandbox}`. The name is an environment
    variable's; with `expose_in_sandbox` (the default, as OpenHands exports every custom secret)
    your sandboxes' shells have it as one, and its value is masked as `<secret_hidden>` in
    every event. 409 when the name is taken. Answers once stored."""
    body = await typed_body(request, bus, SecretBody)
    name, value = _checked_name(body.name), _checked_value(body.value)
    box = _box(request)
    stored = await bus.user_secrets(user)
    if name in stored.custom_secrets:
        raise Problem(409, f"secret {name} already exists", kind="conflict")
    if len(stored.custom_secrets) >= MAX_CUSTOM_SECRETS:
        raise _invalid(f"at most {MAX_CUSTOM_SECRETS} secrets may be stored")
    secret = CustomSecret(
        value=box.seal(value, custom_secret_context(user, name)),
        description=body.description or "",
        expose_in_sandbox=body.expose_in_sandbox,
    )
    await _store(bus, StoreSecret(user_id=user, secret_name=name, secret=secret))
    return json_response(SecretsMessage(message="Secret created successfully"), 201)


@router.put("/secrets/{secret_id}", summary="Rename or change a custom secret")
async def update_secret(
    request: Request, secret_id: SecretId, user: UserId, bus: BusDep
) -> Response:
    """Body: `{name, description}` (OpenHands' rename), and optionally a new `value` and
    `expose_in_sandbox`. 404 for an unknown secret, 409 when the new name is another's."""
    body = await typed_body(request, bus, SecretUpdateBody)
    name = _checked_name(body.name)
    box = _box(request)
    stored = await bus.user_secrets(user)
    current = stored.custom_secrets.get(secret_id)
    if current is None:
        raise Problem(404, f"secret {secret_id} not found", kind="not-found")
    if name != secret_id and name in stored.custom_secrets:
        raise Problem(409, f"secret {name} already exists", kind="conflict")
    if body.value is not None:
        value = _checked_value(body.value)
    else:
        try:  # sealed for its old name: sealed again for the new one
            value = box.open(current.value, custom_secret_context(user, secret_id))
        except SecretError as error:
            raise Problem(
                409,
                f"secret {secret_id} does not open with this server's key; set a new value",
                kind="conflict",
            ) from error
    secret = CustomSecret(
        value=box.seal(value, custom_secret_context(user, name)),
        description=current.description if body.description is None else body.description,
        expose_in_sandbox=current.expose_in_sandbox
        if body.expose_in_sandbox is None
        else body.expose_in_sandbox,
    )
    command = StoreSecret(user_id=user, secret_name=name, secret=secret, replaces=secret_id)
    await _store(bus, command)
    return json_response(SecretsMessage(message="Secret updated successfully"))


@router.delete("/secrets/{secret_id}", summary="Delete a custom secret")
async def delete_secret(secret_id: SecretId, user: UserId, bus: BusDep) -> Response:
    """404 for an unknown secret. Sandboxes started before keep it until they end."""
    if secret_id not in (await bus.user_secrets(user)).custom_secrets:
        raise Problem(404, f"secret {secret_id} not found", kind="not-found")
    await _store(bus, DeleteSecret(user_id=user, secret_name=secret_id))
    return json_response(SecretsMessage(message="Secret deleted successfully"))


# --- git provider tokens ----------------------------------------------------------------------


@router.post("/add-git-providers", summary="Store git provider tokens")
async def add_git_providers(request: Request, user: UserId, bus: BusDep) -> Response:
    """Body: `{provider_tokens: {github: {token, host}}}` for github, gitlab, bitbucket,
    azure_devops and generic. A conversation whose `git_provider` names one clones with its
    token, through a credential helper on the runner's host (never in a URL, an event or the
    sandbox); `host` replaces the provider's public host (`name[:port]`, or `http://...`).
    A provider sent without a token keeps its stored token with the new host; providers not
    sent are kept. Answers once stored."""
    body = await typed_body(request, bus, ProviderTokensBody)
    box = _box(request)
    updates = {
        provider: ProviderTokenUpdate(
            token=box.seal(entry.token, provider_token_context(user, provider))
            if entry.token
            else None,
            host=entry.host or None,
        )
        for provider, entry in body.provider_tokens.items()
    }
    await _store(bus, StoreProviderTokens(user_id=user, provider_tokens=updates))
    return json_response(SecretsMessage(message="Git providers stored"))


@router.post("/unset-provider-tokens", summary="Remove every git provider token")
async def unset_provider_tokens(user: UserId, bus: BusDep) -> Response:
    """Clones that need a token fail from now on (`clone_failed`); custom secrets stay."""
    await _store(bus, UnsetProviderTokens(user_id=user))
    return json_response(SecretsMessage(message="Unset Git provider tokens"))
