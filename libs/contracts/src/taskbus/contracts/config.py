"""Typed settings from `TASKBUS_*` environment variables, one msgspec Struct per service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import msgspec

PREFIX = "TASKBUS_"

S = TypeVar("S", bound=msgspec.Struct)


class SettingsError(ValueError):
    pass


def settings_from_env(settings_type: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build `settings_type` from `TASKBUS_<FIELD>` variables; unset fields keep their defaults.

    Values are strings converted by msgspec (`strict=False`), so "3" becomes 3 and "true" True.
    """
    env = os.environ if environ is None else environ
    raw = {
        field: env[PREFIX + field.upper()]
        for field in settings_type.__struct_fields__
        if PREFIX + field.upper() in env
    }
    try:
        return msgspec.convert(raw, settings_type, strict=False)
    except msgspec.ValidationError as error:
        raise SettingsError(f"invalid {PREFIX}* setting: {error}") from error
