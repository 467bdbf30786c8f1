"""The LLM adapter: one litellm `acompletion` per agent step, with typed errors and real cost.

Every attempt has a deadline of its own (`llm_timeout_seconds`, kept here, not only passed to
litellm, so a model that accepts the request and never answers cannot hold a conversation), and
while it waits the caller hears of it every `llm_heartbeat_seconds` (`WaitListener`): a slow or
hung model is a visible state, never a silent RUNNING.

litellm is imported here alone, on the first call and in a worker thread (`_litellm`): the
import takes seconds of CPU and a few hundred MB, which a starting or idle session-manager need
not pay, and which would stall every conversation if it ran on the event loop.
`LITELLM_LOCAL_MODEL_COST_MAP` keeps it from fetching its price map from the internet.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import msgspec

from taskbus.contracts.events import ToolCall
from taskbus.contracts.llm_endpoints import (
    AllowList,
    EndpointRefused,
    check_destination,
    user_base_url,
)
from taskbus.contracts.observability import LITELLM_LOGGERS, route_to_root, span
from taskbus.contracts.secret_box import SecretBox, SecretError, llm_key_context
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.tasks import cancel_and_wait
from taskbus.session_manager import metrics
from taskbus.session_manager.settings import SessionManagerSettings

logger = logging.getLogger(__name__)


@functools.cache
def _litellm() -> ModuleType:
    """litellm, imported and set up once per process; call it off the event loop."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True  # its "Give Feedback" banners go to stdout on every error
    route_to_root(*LITELLM_LOGGERS)  # its lines once, as JSON, at WARNING unless asked for more
    return litellm


@functools.cache
def _retryable() -> dict[type[Exception], str]:
    """The litellm errors retried with backoff, and the code each fails with at last."""
    from litellm.exceptions import (
        APIConnectionError,
        BadGatewayError,
        InternalServerError,
        RateLimitError,
        ServiceUnavailableError,
        Timeout,
    )

    return {
        RateLimitError: "llm_rate_limited",
        ServiceUnavailableError: "llm_unavailable",
        InternalServerError: "llm_unavailable",
        BadGatewayError: "llm_unavailable",
        APIConnectionError: "llm_unavailable",
        Timeout: "llm_timeout",
        _Deadline: "llm_timeout",
    }


# Sent as the key of a user's endpoint when they set none: an explicit key keeps litellm from
# falling back to a provider key in the service's environment (OPENAI_API_KEY and the like).
NO_KEY = "taskbus-no-key"


@dataclass(frozen=True)
class LLMConfig:
    model: str
    base_url: str | None
    api_key: str | None = field(default=None, repr=False)
    # A user's endpoint: checked against the allow-list and DNS before every call.
    users: bool = False


class LLMError(Exception):
    """A failed completion; `code` goes into ErrorObservation and the status reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_llm_config(
    settings: SessionManagerSettings,
    user_id: str,
    user: UserSettings | None,
    box: SecretBox | None,
) -> LLMConfig:
    """The operator's model, base URL and key, or the user's set alone: a user who sets any of
    the three gets none of the operator's, so the operator's key only ever goes to the
    operator's endpoint. The user's key is opened here, just before the call."""
    if user is None or not (user.llm_model or user.llm_base_url or user.llm_api_key):
        return LLMConfig(
            model=settings.llm_model, base_url=settings.llm_base_url, api_key=settings.llm_api_key
        )
    if not user.llm_model:
        raise LLMError("llm_settings_invalid", "your LLM settings name no llm_model")
    try:
        base_url = user_base_url(user.llm_model, user.llm_base_url)
    except EndpointRefused as error:
        raise LLMError("llm_settings_invalid", str(error)) from None
    api_key = NO_KEY
    if user.llm_api_key:
        if box is None:
            raise LLMError("llm_settings_invalid", "no secrets key is configured to open your key")
        try:
            api_key = box.open(user.llm_api_key, llm_key_context(user_id))
        except SecretError:
            raise LLMError(
                "llm_settings_invalid", "your stored LLM key cannot be opened; set it again"
            ) from None
    return LLMConfig(model=user.llm_model, base_url=base_url, api_key=api_key, users=True)


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    content: str | None
    tool_calls: list[ToolCall]
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: float
    response_id: str


# Called before each backoff with the error code and the delay in seconds.
RetryListener = Callable[[str, float], Awaitable[None]]
# Called while an attempt waits: the seconds it has waited, its number (1-based), and how many
# attempts there will be at most.
WaitListener = Callable[[float, int, int], Awaitable[None]]


class _Deadline(Exception):
    """An attempt passed `llm_timeout_seconds` without an answer."""


def register_prices(litellm: ModuleType, settings: SessionManagerSettings) -> None:
    """Make litellm price the operator's model, so LLMMetrics carry a real cost."""
    if settings.llm_input_cost_per_token is None or settings.llm_output_cost_per_token is None:
        return
    provider, _, _ = settings.llm_model.partition("/")
    litellm.register_model(
        {
            settings.llm_model: {
                "input_cost_per_token": settings.llm_input_cost_per_token,
                "output_cost_per_token": settings.llm_output_cost_per_token,
                "litellm_provider": provider or "openai",
                "mode": "chat",
                "max_tokens": 8192,
                "max_input_tokens": 200_000,
            }
        }
    )


class LLM:
    def __init__(self, settings: SessionManagerSettings) -> None:
        self._settings = settings
        self._allowed = AllowList(settings.llm_allowed_base_urls)
        self._box = SecretBox.from_settings(settings.secrets_key, settings.secrets_key_file)
        # Per model: litellm's map does not change once `_library` has registered the prices.
        self._max_input_tokens: dict[str, int | None] = {}

    @functools.cached_property
    def _library(self) -> ModuleType:
        """litellm with the operator's prices registered (blocking: the first time it imports)."""
        litellm = _litellm()
        register_prices(litellm, self._settings)
        return litellm

    def config_for(self, user_id: str, user: UserSettings | None) -> LLMConfig:
        return resolve_llm_config(self._settings, user_id, user, self._box)

    async def max_input_tokens(self, config: LLMConfig) -> int | None:
        """The prompt size the model accepts: the operator's setting, else litellm's model map,
        looked up once per model (off the event loop: the first lookup imports litellm)."""
        if self._settings.llm_max_input_tokens is not None:
            return self._settings.llm_max_input_tokens
        if config.model not in self._max_input_tokens:
            known = await asyncio.to_thread(self._known_max_input_tokens, config.model)
            self._max_input_tokens[config.model] = known
        return self._max_input_tokens[config.model]

    def _known_max_input_tokens(self, model: str) -> int | None:
        try:
            known = self._library.get_model_info(model).get("max_input_tokens")
        except Exception:  # litellm raises plain exceptions for models it does not know
            return None
        return int(known) if known else None

    def count_tokens(
        self, config: LLMConfig, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> int:
        return int(self._library.token_counter(model=config.model, messages=messages, tools=tools))

    async def complete(
        self,
        config: LLMConfig,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_retry: RetryListener | None = None,
        on_wait: WaitListener | None = None,
    ) -> Completion:
        """One completion; rate limits, unavailability and timeouts are retried with backoff.
        A user's endpoint is checked first, its name resolved anew. Error messages never carry
        the API key, even when the provider echoes it."""
        endpoint = metrics.endpoint(config.users)
        try:
            with span("llm completion", endpoint=endpoint):
                if config.users:
                    await self._check_endpoint(config)
                completion = await self._complete(config, messages, tools, on_retry, on_wait)
        except LLMError as error:
            metrics.LLM_FAILURES.labels(endpoint, error.code).inc()
            if config.api_key and config.api_key in str(error):
                raise LLMError(error.code, redact(str(error), config.api_key)) from None
            raise
        metrics.LLM_LATENCY.labels(endpoint).observe(completion.latency_ms / 1000)
        metrics.LLM_COST.labels(endpoint).inc(completion.cost)
        return completion

    async def _check_endpoint(self, config: LLMConfig) -> None:
        assert config.base_url is not None  # a user's config always names its endpoint
        try:
            await check_destination(config.base_url, self._allowed)
        except EndpointRefused as error:
            raise LLMError("llm_endpoint_refused", str(error)) from None

    async def _complete(
        self,
        config: LLMConfig,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_retry: RetryListener | None,
        on_wait: WaitListener | None,
    ) -> Completion:
        litellm = await asyncio.to_thread(lambda: self._library)
        from litellm.exceptions import AuthenticationError, BadRequestError

        retryable = _retryable()
        retries = self._settings.llm_num_retries
        for attempt in range(retries + 1):
            started = time.perf_counter()
            try:
                call = litellm.acompletion(
                    model=config.model,
                    api_base=config.base_url,
                    api_key=config.api_key,
                    messages=messages,
                    tools=tools,
                    timeout=self._settings.llm_timeout_seconds,
                    max_retries=0,  # retries are ours, so they are counted and logged
                )
                response = await self._answer(call, attempt + 1, retries + 1, on_wait)
            except AuthenticationError as error:
                # The provider's message may echo part of the key: it is not passed on.
                raise LLMError(
                    "llm_auth", f"the LLM rejected the credentials for {config.model}"
                ) from error
            except tuple(retryable) as error:
                code = next(c for t, c in retryable.items() if isinstance(error, t))
                if attempt == retries:
                    what = str(error) if isinstance(error, _Deadline) else type(error).__name__
                    raise LLMError(
                        code, f"{config.model}: {what} after {retries + 1} attempts"
                    ) from error
                delay = self._settings.llm_retry_backoff_seconds * 2**attempt
                logger.warning("%s from %s; retry in %.1fs", code, config.model, delay)
                if on_retry is not None:
                    await on_retry(code, delay)
                await asyncio.sleep(delay)
                continue
            except BadRequestError as error:
                message = f"{config.model} refused the request: {error.message[:500]}"
                raise LLMError("llm_bad_request", message) from error
            except Exception as error:  # any other failure becomes a typed error event
                raise LLMError("llm_error", f"{config.model}: {type(error).__name__}") from error
            latency_ms = (time.perf_counter() - started) * 1000
            return _completion(litellm, response, config.model, latency_ms)
        raise AssertionError("unreachable")

    async def _answer(
        self, call: Awaitable[Any], attempt: int, attempts: int, on_wait: WaitListener | None
    ) -> Any:
        """The answer of one attempt, heard of every `llm_heartbeat_seconds` while it waits,
        abandoned (`_Deadline`) at `llm_timeout_seconds` on this service's own clock: litellm's
        `timeout` is httpx's, per read, so a model trickling bytes would never reach it."""
        deadline = self._settings.llm_timeout_seconds
        answer = asyncio.ensure_future(call)
        started = time.monotonic()
        try:
            while True:
                waited = time.monotonic() - started
                if waited >= deadline:
                    raise _Deadline(f"no answer within {deadline:g}s")
                heartbeat = min(self._settings.llm_heartbeat_seconds, deadline - waited)
                done, _ = await asyncio.wait({answer}, timeout=heartbeat)
                if done:
                    return answer.result()
                waited = time.monotonic() - started
                if on_wait is not None and waited < deadline:
                    await on_wait(waited, attempt, attempts)
        finally:
            await cancel_and_wait(answer)  # an abandoned call holds no connection


def token_bound(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
    """An upper bound of what `LLM.count_tokens` counts, without tokenizing: every token of
    the tokenizers litellm counts with stands for at least one byte of text, so twice the
    prompt's JSON bytes, plus each message's framing tokens, is more than the count. None for a
    prompt with images (content parts), which are counted by their size, not their bytes."""
    if any(not isinstance(m.get("content"), str | None) for m in messages):
        return None
    return 2 * len(msgspec.json.encode([messages, tools])) + 8 * len(messages) + 64


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]")


def _completion(litellm: ModuleType, response: Any, model: str, latency_ms: float) -> Completion:
    message = response.choices[0].message
    usage = response.usage
    return Completion(
        model=model,
        content=message.content,
        tool_calls=[
            ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments or "")
            for call in message.tool_calls or []
        ],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=_cost(litellm, response),
        latency_ms=latency_ms,
        response_id=response.id or "",
    )


def _cost(litellm: ModuleType, response: Any) -> float:
    """litellm's own price of the completion; 0 for a model it has no price for."""
    cost = response._hidden_params.get("response_cost")
    if cost is None:
        try:
            cost = litellm.completion_cost(response)
        except Exception:  # litellm raises plain exceptions for unpriced models
            logger.info("no price known for %s; cost recorded as 0", response.model)
            cost = 0.0
    return float(cost)
