"""Secrets at rest in NATS (users' LLM keys in `taskbus_settings`, and in the UpdateSettings
command that carries them there): AES-256-GCM under a key that lives outside NATS.

Whoever can read the bucket or the command stream sees only `sealed:v1:` tokens. The key comes
from `TASKBUS_SECRETS_KEY` or the file `TASKBUS_SECRETS_KEY_FILE` (`taskbus up` writes one,
0600, under the data dir); the gateway seals, session-manager opens at call time. A token is
bound to its context (e.g. the user id), so it cannot be moved to another user's settings.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED_PREFIX = "sealed:v1:"
_NONCE_BYTES = 12


class SecretError(ValueError):
    """A key that cannot be used, or a token that does not open (wrong key, context or bytes)."""


def generate_key() -> str:
    """A new 256-bit key, urlsafe base64: the format of TASKBUS_SECRETS_KEY and its file."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def ensure_key_file(path: Path) -> Path:
    """The key file at `path`, created 0600 with a new key when missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(generate_key() + "\n")
    return path


class SecretBox:
    def __init__(self, key: str) -> None:
        try:
            raw = base64.urlsafe_b64decode(key.strip().encode())
        except (binascii.Error, ValueError) as error:
            raise SecretError("the secrets key is not urlsafe base64") from error
        if len(raw) != 32:
            raise SecretError("the secrets key must be 32 bytes (urlsafe base64 of 32 bytes)")
        self._aead = AESGCM(raw)

    @classmethod
    def from_settings(cls, key: str | None, key_file: str | None) -> SecretBox | None:
        """The box of TASKBUS_SECRETS_KEY, else of TASKBUS_SECRETS_KEY_FILE; None if neither."""
        if key:
            return cls(key)
        if key_file:
            try:
                return cls(Path(key_file).read_text())
            except OSError as error:
                raise SecretError(f"cannot read the secrets key file {key_file}") from error
        return None

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, context: str) -> str:
        if not is_sealed(token):
            raise SecretError("the value is not sealed")
        try:
            raw = base64.urlsafe_b64decode(token.removeprefix(SEALED_PREFIX).encode())
            plaintext = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
        except (binascii.Error, ValueError, InvalidTag) as error:
            raise SecretError("the sealed value does not open with this key") from error
        return plaintext.decode()


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def llm_key_context(user_id: str) -> str:
    """The context a user's LLM key is sealed under: it opens only as that user's key."""
    return f"taskbus_settings/{user_id}/llm_api_key"


def mcp_secret_context(user_id: str) -> str:
    """The context of the secrets in a user's MCP config (a remote server's `api_key`, a stdio
    server's `env` values): they open only in that user's conversations."""
    return f"taskbus_mcp/{user_id}"
