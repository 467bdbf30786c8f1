"""User settings as the gateway takes and serves them: an LLM set the operator allows, its key
sealed before it enters NATS and never shown again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from taskbus.contracts.llm_endpoints import (
    AllowList,
    EndpointRefused,
    EndpointUnresolved,
    check_destination,
    user_base_url,
)
from taskbus.contracts.secret_box import SecretBox, llm_key_context
from taskbus.contracts.specs import MAX_SECRET_CHARS, ConcurrencyPolicy, MCPConfig, UserSettings
from taskbus.contracts.user_secrets import UserSecrets
from taskbus.gateway.inputs import decode_json
from taskbus.gateway.problems import Problem
from taskbus.gateway.settings import GatewaySettings


class SettingsView(msgspec.Struct, frozen=True, kw_only=True):
    """GET/PUT /api/settings answer: the settings with `llm_api_key` replaced by whether one is
    stored, so the key never leaves the service once written; `mcp_config`'s secrets are shown
    only as their sealed tokens (see mcp_inputs)."""

    llm_model: str | None = None
    llm_api_key_set: bool = False
    llm_base_url: str | None = None
    max_budget_per_task: float | None = None
    max_iterations: int | None = None
    max_concurrent_conversations: int | None = None
    no_change_timeout_seconds: float | None = None
    confirmation_mode: bool = False
    concurrency_policy: ConcurrencyPolicy | None = None
    mcp_config: MCPConfig | None = None
    # OpenHands' ApiSettings keys its frontend reads (frontend/src/types/settings.ts at 0.56.0)
    # that Taskbus has no setting for: fixed values, documented in docs/openhands-compat.md.
    agent: str = "CodeActAgent"
    language: str = "en"
    llm_api_key: None = None
    search_api_key_set: bool = False
    security_analyzer: None = None
    remote_runtime_resource_factor: None = None
    enable_default_condenser: bool = True
    condenser_max_size: None = None
    enable_sound_notifications: bool = False
    enable_proactive_conversation_starters: bool = False
    enable_solvability_analysis: bool = False
    user_consents_to_analytics: None = None
    # The providers the user stored a git token for, each with its host (null: the provider's
    # public one), as OpenHands' frontend reads them; never the tokens.
    provider_tokens_set: dict[str, str | None] = {}

    @classmethod
    def of(cls, settings: UserSettings | None, secrets: UserSecrets | None = None) -> SettingsView:
        """None (nothing stored yet) is the defaults. An empty key counts as none: it is how a
        client clears the key."""
        providers = {
            provider.value: token.host
            for provider, token in (secrets.provider_tokens if secrets else {}).items()
        }
        if settings is None:
            return cls(provider_tokens_set=providers)
        fields = msgspec.structs.asdict(settings)
        fields["llm_api_key_set"] = bool(fields.pop("llm_api_key"))
        return cls(**fields, provider_tokens_set=providers)


# ApiSettings keys OpenHands' frontend posts that Taskbus has no setting for (the fixed values
# of SettingsView): POST /api/settings drops them, where PUT refuses any key it does not know.
OPENHANDS_ONLY_SETTINGS = frozenset(
    {
        *("agent", "language", "search_api_key", "security_analyzer"),
        *("remote_runtime_resource_factor", "enable_default_condenser", "condenser_max_size"),
        *("enable_sound_notifications", "enable_proactive_conversation_starters"),
        *("enable_solvability_analysis", "user_consents_to_analytics", "provider_tokens"),
        *("email", "email_verified", "git_user_name", "git_user_email"),
        *("llm_api_key_set", "search_api_key_set", "provider_tokens_set"),
    }
)


_object_decoder: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, Any])


def openhands_settings(body: bytes) -> UserSettings:
    """POST /api/settings' body as UserSettings, once the OpenHands-only keys are dropped.
    Raises msgspec.DecodeError (ValidationError for a wrong shape)."""
    posted = decode_json(body or b"{}", _object_decoder)
    kept = {key: value for key, value in posted.items() if key not in OPENHANDS_ONLY_SETTINGS}
    return msgspec.convert(kept, UserSettings)


def reflects(stored: UserSettings, requested: UserSettings) -> bool:
    """Whether the stored settings are the outcome of a PUT of `requested`: every field equal,
    except that an absent (null) key in the request keeps whatever key is stored."""
    if requested.llm_api_key is None:
        requested = msgspec.structs.replace(requested, llm_api_key=stored.llm_api_key)
    return stored == requested


@dataclass(frozen=True)
class SettingsPolicy:
    """What the operator lets users' LLM settings do, built once from the gateway's settings."""

    allowed: AllowList
    box: SecretBox | None

    @classmethod
    def of(cls, settings: GatewaySettings) -> SettingsPolicy:
        return cls(
            allowed=AllowList(settings.llm_allowed_base_urls),
            box=SecretBox.from_settings(settings.secrets_key, settings.secrets_key_file),
        )


def _invalid(detail: str) -> Problem:
    return Problem(422, detail, kind="validation-error", title="Invalid LLM settings")


async def admissible(settings: UserSettings, user_id: str, policy: SettingsPolicy) -> UserSettings:
    """The settings as they may be stored, or a 422 Problem. A user's model, base URL and key
    are one set (session-manager never completes it with the operator's), so a set names its
    model; its endpoint must be allowed and resolve to public addresses now (a name that does
    not resolve yet is left to the check before each call); its key is sealed for this user."""
    if settings.llm_model or settings.llm_base_url or settings.llm_api_key:
        if not settings.llm_model:
            raise _invalid("llm_model is required with llm_base_url or llm_api_key")
        try:
            await check_destination(
                user_base_url(settings.llm_model, settings.llm_base_url), policy.allowed
            )
        except EndpointUnresolved:
            pass
        except EndpointRefused as error:
            raise _invalid(str(error)) from None
    if not settings.llm_api_key:
        return settings
    if policy.box is None:
        raise Problem(
            422,
            "this server stores no LLM keys: it has no secrets key to encrypt them with "
            "(TASKBUS_SECRETS_KEY_FILE)",
            kind="secrets-unavailable",
            title="LLM keys cannot be stored",
        )
    sealed = policy.box.seal(settings.llm_api_key, llm_key_context(user_id))
    if len(sealed) > MAX_SECRET_CHARS:
        raise _invalid("llm_api_key is too long")
    return msgspec.structs.replace(settings, llm_api_key=sealed)
