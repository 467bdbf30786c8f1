"""A user's secrets as KV `taskbus_secrets` holds them (key = user id), and the pure changes
the secrets commands make to them.

Every value is sealed (contracts/secret_box.py) by the gateway before it enters NATS, under a
context naming the user and the secret, so a sealed value opens only as what it was sealed
for. Session-manager, the bucket's only writer, applies each secrets command
(contracts/commands.py `SecretsCommand.applied_to`) to the stored entry with a revision check,
so concurrent edits never lose one another; the runner opens the
values at sandbox start: provider tokens for the clone, custom secrets marked
`expose_in_sandbox` as the sandbox's environment variables.

Sizes: at most MAX_CUSTOM_SECRETS secrets of MAX_SECRET_VALUE_BYTES, and one token per
provider, so an entry (and every command) stays well below NATS' max_payload.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts.git_providers import TokenHost
from taskbus.contracts.specs import GitProvider, SealedSecret

MAX_CUSTOM_SECRETS = 32
MAX_SECRET_VALUE_BYTES = 4096
MAX_DESCRIPTION_CHARS = 500
# A custom secret's name is an environment variable's name (it may become one in the sandbox).
SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
SecretName = Annotated[str, msgspec.Meta(pattern=SECRET_NAME_PATTERN)]
Description = Annotated[str, msgspec.Meta(max_length=MAX_DESCRIPTION_CHARS)]
# Names the sandbox's shell and its protocol set themselves, or that change how bash starts:
# a secret may not take them (nor anything of Taskbus' own, `TASKBUS_*`).
RESERVED_NAMES = frozenset(
    {
        *("HOME", "PATH", "LANG", "TERM", "PAGER", "GIT_PAGER", "PYTHONUNBUFFERED", "PWD"),
        *("OLDPWD", "SHELL", "USER", "IFS", "PS0", "PS1", "PS2", "PS4", "PROMPT_COMMAND"),
        *("BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "HISTFILE", "INPUTRC"),
    }
)
RESERVED_PREFIX = "TASKBUS_"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a secret's name beyond its pattern, or None."""
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIX):
        return f"{name} is reserved for the sandbox's own environment"
    return None


class CustomSecret(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A custom secret (its name is its key in `UserSecrets.custom_secrets`)."""

    value: SealedSecret
    description: Description = ""
    # Whether the sandbox's shell has it as an environment variable (masked in every event).
    # On by default, as OpenHands exports every custom secret into the runtime.
    expose_in_sandbox: bool = True


class ProviderToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A git provider token; `host` replaces the provider's public host (see git_providers)."""

    token: SealedSecret
    host: TokenHost | None = None


class ProviderTokenUpdate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One provider of POST /api/add-git-providers: no token keeps the stored one (with the new
    host), as OpenHands does."""

    token: SealedSecret | None = None
    host: TokenHost | None = None


class UserSecrets(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    provider_tokens: dict[GitProvider, ProviderToken] = {}
    custom_secrets: Annotated[
        dict[SecretName, CustomSecret], msgspec.Meta(max_length=MAX_CUSTOM_SECRETS)
    ] = {}


def custom_secret_context(user_id: str, name: str) -> str:
    """The context a custom secret is sealed under: it opens only as this user's `name`."""
    return f"taskbus_secrets/{user_id}/custom/{name}"


def provider_token_context(user_id: str, provider: GitProvider) -> str:
    return f"taskbus_secrets/{user_id}/provider/{provider.value}"


def decode_user_secrets(data: bytes) -> UserSecrets:
    return msgspec.json.decode(data, type=UserSecrets)


def encode_user_secrets(secrets: UserSecrets) -> bytes:
    return msgspec.json.encode(secrets)
