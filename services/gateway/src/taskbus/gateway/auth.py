"""API keys: each key maps to one user. Keys are held only as SHA-256 digests and never logged."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_BEARER = re.compile(r"^Bearer\s+(\S+)\s*$", re.IGNORECASE)


class ApiKeyError(ValueError):
    """A malformed key entry; the message never contains the key itself."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Looks keys up by digest: lookup timing can reveal at most a hash, never the key."""

    def __init__(self, users_by_key: dict[str, str]) -> None:
        self._users_by_digest = {_digest(key): user for key, user in users_by_key.items()}

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ApiKeys:
        """Build from `key=user` entries; blank entries and `#` comments are skipped."""
        users_by_key: dict[str, str] = {}
        for number, raw in enumerate(entries, start=1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            key, sep, user = (part.strip() for part in entry.partition("="))
            if not sep or not key or not user:
                raise ApiKeyError(f"API key entry {number} is not of the form key=user")
            users_by_key[key] = user
        return cls(users_by_key)

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: str) -> ApiKeys:
        entries = api_keys.split(",") if api_keys else []
        if api_keys_file:
            entries += Path(api_keys_file).read_text().splitlines()
        return cls.parse(entries)

    def __len__(self) -> int:
        return len(self._users_by_digest)

    def user_for_key(self, key: str) -> str | None:
        return self._users_by_digest.get(_digest(key))

    def user_for_authorization(self, authorization: str | None) -> str | None:
        """The user of an `Authorization: Bearer <key>` header value, or None."""
        if not authorization:
            return None
        match = _BEARER.match(authorization)
        return self.user_for_key(match.group(1)) if match else None
