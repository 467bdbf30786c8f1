from __future__ import annotations

import msgspec
import pytest

from taskbus.contracts.config import SettingsError, settings_from_env


class Example(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    port: int = 3000
    debug: bool = False
    budget: float | None = None


def test_defaults_without_environment() -> None:
    assert settings_from_env(Example, {}) == Example()


def test_values_are_converted_from_strings() -> None:
    env = {"TASKBUS_PORT": "8080", "TASKBUS_DEBUG": "true", "TASKBUS_BUDGET": "2.5", "OTHER": "x"}
    assert settings_from_env(Example, env) == Example(port=8080, debug=True, budget=2.5)


def test_bad_value_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="port"):
        settings_from_env(Example, {"TASKBUS_PORT": "eighty"})
