"""User settings as the gateway serves them: the API key is write-only. Pure, no I/O."""

from __future__ import annotations

import msgspec

from taskbus.contracts.specs import ConcurrencyPolicy, UserSettings


class SettingsView(msgspec.Struct, frozen=True, kw_only=True):
    """GET/PUT /api/settings answer: the settings with `llm_api_key` replaced by whether one is
    stored, so the key never leaves the service once written."""

    llm_model: str | None = None
    llm_api_key_set: bool = False
    llm_base_url: str | None = None
    max_budget_per_task: float | None = None
    max_iterations: int | None = None
    max_concurrent_conversations: int | None = None
    no_change_timeout_seconds: float | None = None
    concurrency_policy: ConcurrencyPolicy | None = None

    @classmethod
    def of(cls, settings: UserSettings | None) -> SettingsView:
        """None (nothing stored yet) is the defaults. An empty key counts as none: it is how a
        client clears the key, and session-manager then falls back to the operator's key."""
        if settings is None:
            return cls()
        fields = msgspec.structs.asdict(settings)
        fields["llm_api_key_set"] = bool(fields.pop("llm_api_key"))
        return cls(**fields)


def reflects(stored: UserSettings, requested: UserSettings) -> bool:
    """Whether the stored settings are the outcome of a PUT of `requested`: every field equal,
    except that an absent (null) key in the request keeps whatever key is stored."""
    if requested.llm_api_key is None:
        requested = msgspec.structs.replace(requested, llm_api_key=stored.llm_api_key)
    return stored == requested
