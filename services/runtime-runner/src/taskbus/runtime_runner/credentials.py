"""A user's secrets, opened on this host for one conversation's sandbox: the git provider token
its clone needs, and the custom secrets its shell has as environment variables.

They are read from KV `taskbus_secrets` (read-only) when they are needed, at the clone and each
time the sandbox's shell starts, and opened with the operator's secrets key. Every value opened
for a conversation is added to its masks (`masking.SecretMasks`) before anything can print it,
so the runner's events carry `<secret_hidden>` instead. The git token never enters the sandbox:
git on this host gets it from a credential helper (`repository.clone`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.events import RuntimeRequested
from taskbus.contracts.git_providers import USERNAMES, GitProviderError, resolve
from taskbus.contracts.secret_box import SecretBox, SecretError
from taskbus.contracts.specs import GitProvider
from taskbus.contracts.user_secrets import (
    UserSecrets,
    custom_secret_context,
    decode_user_secrets,
    name_problem,
    provider_token_context,
)
from taskbus.runtime_runner.masking import SecretMasks
from taskbus.runtime_runner.sandbox import ActionError

logger = logging.getLogger(__name__)


class GitCredential(msgspec.Struct, frozen=True, kw_only=True):
    """What git's credential helper answers, and only for requests to `protocol://host`."""

    username: str
    token: str
    protocol: str
    host: str


class Checkout(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    credential: GitCredential | None = None


class UserSecretsReader:
    """Reads users' entries of the secrets bucket and opens them with the operator's key."""

    def __init__(self, js: JetStreamContext, box: SecretBox | None, masks: SecretMasks) -> None:
        self._js = js
        self._box = box
        self.masks = masks

    def for_request(self, request: RuntimeRequested) -> ConversationSecrets:
        return ConversationSecrets(
            self, request.conversation_id, request.user_id, request.git_provider
        )

    async def stored(self, user_id: str) -> UserSecrets:
        try:
            entry = await (await self._js.key_value(subjects.SECRETS_BUCKET)).get(user_id)
        except KeyNotFoundError:
            return UserSecrets()
        except (nats.errors.Error, TimeoutError) as error:
            raise ActionError(
                "secrets_unavailable", f"the secrets store did not answer: {error!r}"
            ) from error
        try:
            return decode_user_secrets(entry.value or b"{}")
        except msgspec.DecodeError:
            raise ActionError(
                "secrets_unavailable", "the stored secrets of this user cannot be read"
            ) from None

    def open(self, sealed: str, context: str, what: str) -> str:
        if self._box is None:
            raise ActionError(
                "secrets_unavailable",
                f"{what} cannot be opened: this runner has no secrets key "
                "(TASKBUS_SECRETS_KEY_FILE)",
            )
        try:
            return self._box.open(sealed, context)
        except SecretError:
            raise ActionError(
                "secrets_unavailable", f"{what} does not open with this runner's secrets key"
            ) from None


class ConversationSecrets:
    """One conversation's view of its user's secrets (see the module's docstring)."""

    def __init__(
        self,
        reader: UserSecretsReader,
        conversation_id: str,
        user_id: str,
        git_provider: GitProvider | None,
    ) -> None:
        self._reader = reader
        self._conversation_id = conversation_id
        self._user_id = user_id
        self._git_provider = git_provider

    def _masked(self, values: Iterable[str]) -> None:
        self._reader.masks.add(self._conversation_id, values)

    async def checkout(self, repository: str) -> Checkout:
        """What to clone for `repository`, and with which credential: the user's token of the
        conversation's provider, offered to the resolved URL's host only."""
        provider = self._git_provider
        if provider is None:
            return Checkout(url=repository)
        stored = (await self._reader.stored(self._user_id)).provider_tokens.get(provider)
        try:
            source = resolve(repository, provider, stored.host if stored else None)
        except GitProviderError as error:
            raise ActionError("clone_failed", str(error)) from None
        if stored is None:
            return Checkout(url=source.url)
        token = self._reader.open(
            stored.token,
            provider_token_context(self._user_id, provider),
            f"the {provider.value} token",
        )
        self._masked([token])
        credential = GitCredential(
            username=USERNAMES[provider], token=token, protocol=source.protocol, host=source.host
        )
        return Checkout(url=source.url, credential=credential)

    async def environment(self) -> dict[str, str]:
        """The custom secrets marked for the sandbox, by name (masked from now on)."""
        secrets = (await self._reader.stored(self._user_id)).custom_secrets
        opened = {}
        for name, secret in secrets.items():
            if not secret.expose_in_sandbox:
                continue
            if name_problem(name) is not None:  # the gateway refuses these; never exported
                logger.warning("skipping secret %r of user %s: reserved", name, self._user_id)
                continue
            opened[name] = self._reader.open(
                secret.value, custom_secret_context(self._user_id, name), f"secret {name}"
            )
        self._masked(opened.values())
        return opened
