"""OpenAPI for the endpoints whose bodies are msgspec types (FastAPI only sees pydantic ones),
and the problem responses every operation may answer, so the document says what is returned."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.gateway.conversations import ConversationList, ConversationView, CreatedConversation
from taskbus.gateway.inputs import MessageBody, StartBody
from taskbus.gateway.problems import PROBLEM_MEDIA_TYPE
from taskbus.gateway.user_settings import SettingsView

_CONVERSATIONS = "/api/conversations"
_CONVERSATION = "/api/conversations/{conversation_id}"
_SETTINGS = "/api/settings"

# (path, method) -> (body type, required): an absent body is `{}`, so it is optional where
# every field is.
_REQUEST_BODIES: dict[tuple[str, str], tuple[type[msgspec.Struct], bool]] = {
    (_CONVERSATIONS, "post"): (ConversationSpec, False),
    (f"{_CONVERSATION}/message", "post"): (MessageBody, True),
    (_SETTINGS, "put"): (UserSettings, False),
    # OpenHands' spelling; it also takes (and drops) the ApiSettings keys Taskbus has no use for.
    (_SETTINGS, "post"): (UserSettings, False),
    (f"{_CONVERSATION}/start", "post"): (StartBody, False),
}
_RESPONSE_BODIES: dict[tuple[str, str, str], type[msgspec.Struct]] = {
    (_CONVERSATIONS, "post", "201"): CreatedConversation,
    (_CONVERSATIONS, "post", "200"): CreatedConversation,
    (_CONVERSATIONS, "get", "200"): ConversationList,
    (_CONVERSATION, "get", "200"): ConversationView,
    (_SETTINGS, "get", "200"): SettingsView,
    (_SETTINGS, "put", "200"): SettingsView,
    (_SETTINGS, "post", "200"): SettingsView,
}


class ProblemDocument(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details; some add members (e.g. `errors`, `retry_after_seconds`)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


# Problems by the shape of the operation: (applies, status, description).
def _is_command(path: str, method: str) -> bool:
    """A control command on one conversation, answered by session-manager's verdict."""
    on_one = path.startswith(f"{_CONVERSATIONS}/{{conversation_id}}")
    return on_one and (method == "delete" or (method == "post" and not path.endswith("/events")))


_PROBLEMS: list[tuple[Any, str, str]] = [
    (lambda path, method, op: "security" in op, "401", "No valid API key"),
    (lambda path, method, op: "{conversation_id}" in path, "404", "No such conversation of yours"),
    (
        lambda path, method, op: method in ("post", "put"),
        "400",
        "Malformed JSON body; for a create, an empty one (`msg_id` "
        "CONFIGURATION$MISSING_USER_MESSAGE, as OpenHands answers it)",
    ),
    (lambda path, method, op: method in ("post", "put"), "413", "Body larger than the bus carries"),
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
    (lambda path, method, op: method in ("post", "put"), "504", "Accepted, not visible yet"),
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


def install_msgspec_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            request_types = [body_type for body_type, _ in _REQUEST_BODIES.values()]
            types = [*request_types, *_RESPONSE_BODIES.values(), ProblemDocument]
            refs, components = msgspec.json.schema_components(
                types, ref_template="#/components/schemas/{name}"
            )
            ref_of = dict(zip(types, refs, strict=True))
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
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
            _add_problem_responses(paths, ref_of[ProblemDocument])
            schema["components"]["schemas"].pop("HTTPValidationError", None)
            schema["components"]["schemas"].pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
