"""Requests to session-manager (not facts): sent on TASKBUS_COMMANDS by the gateway.

A conversation command that names a `command_id` is answered with a `CommandVerdict`, stored
in KV `taskbus_verdicts` under that id once the command's events are in the log. The asker
watches the key's subject (subscribed before it publishes) and reads the key when it misses the
put, so a retried command, dropped by JetStream as a duplicate, gets the first one's verdict.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts import subjects
from taskbus.contracts.specs import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    ConversationSpec,
    GitProvider,
    UserSettings,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.subjects import CONVERSATION_ID_PATTERN
from taskbus.contracts.user_secrets import (
    MAX_CUSTOM_SECRETS,
    CustomSecret,
    ProviderToken,
    ProviderTokenUpdate,
    SecretName,
    UserSecrets,
)

# A command id is a KV key and a subject token: the conversation ids' safe form.
CommandId = Annotated[str, msgspec.Meta(pattern=CONVERSATION_ID_PATTERN.pattern)]


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="command", tag=True):
    """Every command names the user it acts for; session-manager checks ownership."""

    user_id: str

    @classmethod
    def name(cls) -> str:
        return cls.__name__


class CreateConversation(Command):
    conversation_id: str
    spec: ConversationSpec


class ConversationCommand(Command):
    conversation_id: str
    # Where the verdict goes (see the module's docstring); None: nobody waits for one.
    command_id: CommandId | None = None
    # True when `command_id` was made for this command alone (no Idempotency-Key), so no earlier
    # verdict can exist for it: session-manager looks one up only when the command is redelivered.
    fresh_id: bool = False


class SendMessage(ConversationCommand, kw_only=True):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS)]


class StartConversation(ConversationCommand):
    pass


class PauseConversation(ConversationCommand):
    pass


class ResumeConversation(ConversationCommand):
    pass


class StopConversation(ConversationCommand, kw_only=True):
    reason: str = "user_stop"


class DeleteConversation(ConversationCommand):
    pass


class ConfirmAction(ConversationCommand, kw_only=True):
    confirmed: bool


class RenameConversation(ConversationCommand, kw_only=True):
    """A new title (OpenHands' PATCH of the conversation), already stripped by the gateway."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]


class UpdateSettings(Command):
    settings: UserSettings


class SecretsTooMany(ValueError):
    """A new custom secret beyond MAX_CUSTOM_SECRETS: nothing is stored."""


class SecretsCommand(Command):
    """A change to the user's entry in KV `taskbus_secrets` (contracts/user_secrets.py); its
    values are sealed by the gateway. The gateway knows the change is stored once applying it
    again changes nothing (`applied_to(stored) == stored`)."""

    def applied_to(self, secrets: UserSecrets) -> UserSecrets:
        raise NotImplementedError


class StoreSecret(SecretsCommand, kw_only=True):
    """Create or replace the custom secret `secret_name`; `replaces`: the name it had (a
    rename)."""

    secret_name: SecretName
    secret: CustomSecret
    replaces: SecretName | None = None

    def applied_to(self, secrets: UserSecrets) -> UserSecrets:
        custom = {k: v for k, v in secrets.custom_secrets.items() if k != self.replaces}
        custom[self.secret_name] = self.secret
        if len(custom) > MAX_CUSTOM_SECRETS:
            raise SecretsTooMany(f"at most {MAX_CUSTOM_SECRETS} secrets may be stored")
        return msgspec.structs.replace(secrets, custom_secrets=custom)


class DeleteSecret(SecretsCommand, kw_only=True):
    secret_name: SecretName

    def applied_to(self, secrets: UserSecrets) -> UserSecrets:
        custom = {k: v for k, v in secrets.custom_secrets.items() if k != self.secret_name}
        return msgspec.structs.replace(secrets, custom_secrets=custom)


class StoreProviderTokens(SecretsCommand, kw_only=True):
    """OpenHands' add-git-providers: each provider named gets its token and host; one named
    without a token keeps its stored token with the new host; the others stay as they are."""

    provider_tokens: dict[GitProvider, ProviderTokenUpdate]

    def applied_to(self, secrets: UserSecrets) -> UserSecrets:
        tokens = dict(secrets.provider_tokens)
        for provider, update in self.provider_tokens.items():
            if update.token:
                tokens[provider] = ProviderToken(token=update.token, host=update.host)
            elif provider in tokens:
                tokens[provider] = msgspec.structs.replace(tokens[provider], host=update.host)
        return msgspec.structs.replace(secrets, provider_tokens=tokens)


class UnsetProviderTokens(SecretsCommand):
    def applied_to(self, secrets: UserSecrets) -> UserSecrets:
        return msgspec.structs.replace(secrets, provider_tokens={})


class CommandVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """Session-manager's answer to a conversation command. Accepted: its events are in the log,
    up to `last_event_id`, and `status` is the conversation's after them. Refused: nothing was
    appended; `status` is the current one and `reason` (machine-readable) and `detail` say why."""

    command_id: str
    conversation_id: str
    accepted: bool
    status: ConversationStatus | None = None
    reason: str = ""
    detail: str = ""
    last_event_id: int = -1


# Refusal reasons the gateway answers with something other than 409.
NOT_FOUND = "not_found"
QUEUE_FULL = "queue_full"


def encode_verdict(verdict: CommandVerdict) -> bytes:
    return _encoder.encode(verdict)


def decode_verdict(data: bytes) -> CommandVerdict:
    return msgspec.json.decode(data, type=CommandVerdict)


AnyCommand = (
    CreateConversation
    | SendMessage
    | StartConversation
    | PauseConversation
    | ResumeConversation
    | StopConversation
    | DeleteConversation
    | ConfirmAction
    | RenameConversation
    | UpdateSettings
    | StoreSecret
    | DeleteSecret
    | StoreProviderTokens
    | UnsetProviderTokens
)

_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def command_subject(command: Command) -> str:
    """Where `command` goes: its conversation's partition (the instance that owns it applies
    it), or the user commands any instance applies."""
    if isinstance(command, (CreateConversation, ConversationCommand)):
        return subjects.conversation_command_subject(command.conversation_id, command.name())
    return subjects.user_command_subject(command.name())


def decode_command(data: bytes) -> AnyCommand:
    return _decoder.decode(data)
