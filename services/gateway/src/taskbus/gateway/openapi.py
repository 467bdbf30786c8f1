"""OpenAPI for the endpoints whose bodies are msgspec types (FastAPI only sees pydantic ones),
the event union, and the problem responses every operation may answer, so the document says
what is returned; its words and examples come from `api_reference`."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from taskbus.contracts.observability_health import ServiceReadiness
from taskbus.contracts.queries import (
    CostReport,
    DurationReport,
    EventKindReport,
    FailingCommandsReport,
    Reply,
)
from taskbus.contracts.runners import RunnerInfo
from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.gateway import api_reference
from taskbus.gateway.conversations import ConversationList, ConversationView, CreatedConversation
from taskbus.gateway.event_schema import EVENT_SCHEMA, event_components
from taskbus.gateway.inputs import MessageBody
from taskbus.gateway.openhands_inputs import AddEventBody, RenameBody
from taskbus.gateway.problems import PROBLEM_MEDIA_TYPE
from taskbus.gateway.rest import CONTROL_COMMANDS, CommandAccepted, EventAdded
from taskbus.gateway.secrets_routes import (
    ProviderTokensBody,
    SecretBody,
    SecretList,
    SecretsMessage,
    SecretUpdateBody,
)
from taskbus.gateway.user_settings import SettingsView
from taskbus.gateway.webhooks_routes import (
    CreatedWebhook,
    DeliveryList,
    WebhookBody,
    WebhookDeleted,
    WebhookList,
)

_CONVERSATIONS = "/api/conversations"
_CONVERSATION = "/api/conversations/{conversation_id}"
_SETTINGS = "/api/settings"
_SECRETS = "/api/secrets"
_EVENTS = f"{_CONVERSATION}/events"
_ANALYTICS = "/api/analytics"
_WEBHOOKS = "/api/webhooks"


class ProblemDocument(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details; some add members (e.g. `errors`, `retry_after_seconds`)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


class HealthDocument(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/health: the gateway's NATS connection and the runners' sandbox isolation."""

    status: str
    nats: bool
    # Whether every service has a ready instance; `services` has each one's instances.
    ready: bool
    services: dict[str, ServiceReadiness]
    runners: list[RunnerInfo]
    warnings: list[str]


# (path, method) -> (body type, required): an absent body is `{}`, so it is optional where
# every field is.
_REQUEST_BODIES: dict[tuple[str, str], tuple[type[msgspec.Struct], bool]] = {
    (_CONVERSATIONS, "post"): (ConversationSpec, False),
    (f"{_CONVERSATION}/message", "post"): (MessageBody, True),
    (_SETTINGS, "put"): (UserSettings, False),
    # OpenHands' spelling; it also takes (and drops) the ApiSettings keys Taskbus has no use for.
    (_SETTINGS, "post"): (UserSettings, False),
    (_CONVERSATION, "patch"): (RenameBody, True),
    (_EVENTS, "post"): (AddEventBody, True),
    (_SECRETS, "post"): (SecretBody, True),
    (f"{_SECRETS}/{{secret_id}}", "put"): (SecretUpdateBody, True),
    ("/api/add-git-providers", "post"): (ProviderTokensBody, False),
    (_WEBHOOKS, "post"): (WebhookBody, True),
    **{
        (f"{_CONVERSATION}/{action}", "post"): (body_type, False)
        for action, (_, body_type, _) in CONTROL_COMMANDS.items()
    },
}
_RESPONSE_BODIES: dict[tuple[str, str, str], type[msgspec.Struct]] = {
    (_CONVERSATIONS, "post", "201"): CreatedConversation,
    (_CONVERSATIONS, "post", "200"): CreatedConversation,
    (_CONVERSATIONS, "get", "200"): ConversationList,
    ("/api/health", "get", "200"): HealthDocument,
    (_CONVERSATION, "get", "200"): ConversationView,
    (_SETTINGS, "get", "200"): SettingsView,
    (_SETTINGS, "put", "200"): SettingsView,
    (_SETTINGS, "post", "200"): SettingsView,
    **{
        (f"{_CONVERSATION}{suffix}", method, "202"): CommandAccepted
        for suffix, method in [("", "delete"), ("/message", "post")]
        + [(f"/{action}", "post") for action in CONTROL_COMMANDS]
    },
    (_EVENTS, "post", "202"): EventAdded,
    (_SECRETS, "get", "200"): SecretList,
    (_SECRETS, "post", "201"): SecretsMessage,
    (f"{_SECRETS}/{{secret_id}}", "put", "200"): SecretsMessage,
    (f"{_SECRETS}/{{secret_id}}", "delete", "200"): SecretsMessage,
    ("/api/add-git-providers", "post", "200"): SecretsMessage,
    ("/api/unset-provider-tokens", "post", "200"): SecretsMessage,
    (_WEBHOOKS, "post", "201"): CreatedWebhook,
    (_WEBHOOKS, "get", "200"): WebhookList,
    (f"{_WEBHOOKS}/{{webhook_id}}", "delete", "200"): WebhookDeleted,
    (f"{_WEBHOOKS}/{{webhook_id}}/deliveries", "get", "200"): DeliveryList,
    (f"{_ANALYTICS}/cost", "get", "200"): CostReport,
    (f"{_ANALYTICS}/durations", "get", "200"): DurationReport,
    (f"{_ANALYTICS}/event-kinds", "get", "200"): EventKindReport,
    (f"{_ANALYTICS}/failing-commands", "get", "200"): FailingCommandsReport,
}
_EVENT_REF = {"$ref": f"#/components/schemas/{EVENT_SCHEMA}"}
_EVENT_LIST = {"type": "array", "items": _EVENT_REF}
# Answers with no msgspec type of their own: (path, method, status) -> (description, schema).
_HAND_WRITTEN: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {
    (_CONVERSATION, "patch", "202"): (
        "Renamed: OpenHands' `true`",
        {"const": True, "description": "Always true."},
    ),
    (f"{_CONVERSATION}/trajectory", "get", "200"): (
        "OpenHands' `{trajectory}`: every event, in id order",
        {
            "type": "object",
            "properties": {"trajectory": _EVENT_LIST},
            "required": ["trajectory"],
        },
    ),
    (f"{_CONVERSATION}/config", "get", "200"): (
        "OpenHands' runtime ids",
        {
            "type": "object",
            "properties": {
                "runtime_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "session_id": {"type": "string"},
            },
            "required": ["runtime_id", "session_id"],
        },
    ),
    (_EVENTS, "get", "200"): ("A page of events", {"$ref": "#/components/schemas/EventPage"}),
    (f"{_EVENTS}/{{event_id}}", "get", "200"): ("The event", _EVENT_REF),
}
_EVENT_PAGE = {
    "type": "object",
    "description": "A page of events (wire view) and how to read on.",
    "properties": {
        "events": _EVENT_LIST,
        "has_more": {"type": "boolean"},
        "next_start_id": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["events", "has_more", "next_start_id"],
}


# Problems by the shape of the operation: (applies, status, description).
_WITH_BODY = ("post", "put", "patch")


def _is_command(path: str, method: str) -> bool:
    """A control command on one conversation, answered by session-manager's verdict."""
    on_one = path.startswith(f"{_CONVERSATIONS}/{{conversation_id}}")
    return on_one and method in ("delete", "post", "patch")


_PROBLEMS: list[tuple[Any, str, str]] = [
    (lambda path, method, op: "security" in op, "401", "No valid API key"),
    (lambda path, method, op: "{conversation_id}" in path, "404", "No such conversation of yours"),
    (lambda path, method, op: "{secret_id}" in path, "404", "No such secret of yours"),
    (lambda path, method, op: "{webhook_id}" in path, "404", "No such webhook of yours"),
    (
        lambda path, method, op: path.startswith(_SECRETS) and method in ("post", "put"),
        "409",
        "The secret's name is another secret's",
    ),
    (
        lambda path, method, op: method in _WITH_BODY,
        "400",
        "Malformed JSON body; for a create, an empty one (`msg_id` "
        "CONFIGURATION$MISSING_USER_MESSAGE, as OpenHands answers it)",
    ),
    (lambda path, method, op: method in _WITH_BODY, "413", "Body larger than the bus carries"),
    (lambda path, method, op: path != "/api/health", "422", "Invalid parameter or body"),
    (lambda path, method, op: path != "/api/health", "503", "A service did not answer in time"),
    (lambda path, method, op: (path, method) == (_CONVERSATIONS, "post"), "409", "Id taken"),
    (lambda path, method, op: (path, method) == (_CONVERSATIONS, "post"), "429", "Rate limited"),
    (
        lambda path, method, op: _is_command(path, method),
        "409",
        "Refused: the conversation's status does not allow this command (contracts' "
        "transition table); the problem carries the current status and the reason",
    ),
    (
        lambda path, method, op: path.endswith("/start") and method == "post",
        "429",
        "The user's queue of waiting conversations is full",
    ),
    (lambda path, method, op: method in _WITH_BODY, "504", "Accepted, not visible yet"),
]


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _add_problem_responses(paths: dict[str, Any], problem_ref: dict[str, Any]) -> None:
    """Declare each operation's problem answers as `application/problem+json` (replacing
    FastAPI's pydantic-shaped 422, which the gateway never sends)."""
    content = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for applies, status, description in _PROBLEMS:
                if applies(path, method, operation):
                    responses[status] = {"description": description, "content": content}


def _without_reply_tag(schemas: dict[str, Any]) -> None:
    """Reports are served without the reply's `type` tag (analytics.report_response)."""
    for reply in Reply.__subclasses__():
        schema = schemas.get(reply.__name__)
        if schema is not None:
            schema["properties"].pop("type", None)
            schema["required"] = [name for name in schema.get("required", []) if name != "type"]


def _describe(schema: dict[str, Any], name: str) -> None:
    """Give each property of a component (and of its inline objects) its api_reference words."""
    for field, property_schema in schema.get("properties", {}).items():
        if "description" not in property_schema:
            text = api_reference.description(name, field)
            if text is not None:
                property_schema["description"] = text
        _describe(property_schema, name)
    items = schema.get("items")
    if isinstance(items, dict):
        _describe(items, name)


def _add_examples(paths: dict[str, Any]) -> None:
    """Each operation's request example and the example of its main success answer."""
    for (path, method), (request, answer) in api_reference.EXAMPLES.items():
        operation = paths[path][method]
        if request is not None:
            body = operation["requestBody"]["content"]["application/json"]
            body["example"] = api_reference.as_json(request)
        success = min(status for status in operation["responses"] if status.startswith("2"))
        content = operation["responses"][success].setdefault("content", {})
        media = next(iter(content), "application/json")  # e.g. a zip download's
        content.setdefault(media, {})["example"] = api_reference.as_json(answer)


def _describe_parameters(paths: dict[str, Any]) -> None:
    for operations in paths.values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                text = api_reference.PARAMETER_DESCRIPTIONS.get(parameter["name"])
                if "description" not in parameter and text is not None:
                    parameter["description"] = text


def install_msgspec_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=api_reference.API_DESCRIPTION,
                routes=app.routes,
            )
            request_types = [body_type for body_type, _ in _REQUEST_BODIES.values()]
            types = [*request_types, *_RESPONSE_BODIES.values(), ProblemDocument]
            refs, components = msgspec.json.schema_components(
                types, ref_template="#/components/schemas/{name}"
            )
            ref_of = dict(zip(types, refs, strict=True))
            _without_reply_tag(components)
            components.update(event_components())
            components["EventPage"] = _EVENT_PAGE
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(components)
            paths = schema["paths"]
            for (path, method), (body_type, required) in _REQUEST_BODIES.items():
                paths[path][method]["requestBody"] = {
                    "required": required,
                    "content": _json_content(ref_of[body_type]),
                }
            for (path, method, status), body_type in _RESPONSE_BODIES.items():
                responses = paths[path][method].setdefault("responses", {})
                responses[status] = {
                    "description": body_type.__doc__ or body_type.__name__,
                    "content": _json_content(ref_of[body_type]),
                }
            for (path, method, status), (text, answer) in _HAND_WRITTEN.items():
                _describe(answer, "")
                responses = paths[path][method]["responses"]
                responses[status] = {"description": text, "content": _json_content(answer)}
            paths[_EVENTS]["get"]["description"] += api_reference.WEBSOCKET_NOTE
            _add_problem_responses(paths, ref_of[ProblemDocument])
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            for name, component in schemas.items():
                _describe(component, name)
            _describe_parameters(paths)
            _add_examples(paths)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
