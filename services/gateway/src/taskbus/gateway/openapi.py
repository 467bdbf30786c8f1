"""OpenAPI for the endpoints whose bodies are msgspec types (FastAPI only sees pydantic ones)."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.gateway.conversations import ConversationList, ConversationView, CreatedConversation
from taskbus.gateway.inputs import MessageBody
from taskbus.gateway.user_settings import SettingsView

_CONVERSATIONS = "/api/conversations"
_CONVERSATION = "/api/conversations/{conversation_id}"
_SETTINGS = "/api/settings"

_REQUEST_BODIES: dict[tuple[str, str], type[msgspec.Struct]] = {
    (_CONVERSATIONS, "post"): ConversationSpec,
    (f"{_CONVERSATION}/message", "post"): MessageBody,
    (_SETTINGS, "put"): UserSettings,
}
_RESPONSE_BODIES: dict[tuple[str, str, str], type[msgspec.Struct]] = {
    (_CONVERSATIONS, "post", "201"): CreatedConversation,
    (_CONVERSATIONS, "get", "200"): ConversationList,
    (_CONVERSATION, "get", "200"): ConversationView,
    (_SETTINGS, "get", "200"): SettingsView,
    (_SETTINGS, "put", "200"): SettingsView,
}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def install_msgspec_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            types = [*_REQUEST_BODIES.values(), *_RESPONSE_BODIES.values()]
            refs, components = msgspec.json.schema_components(
                types, ref_template="#/components/schemas/{name}"
            )
            ref_of = dict(zip(types, refs, strict=True))
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            paths = schema["paths"]
            for (path, method), body_type in _REQUEST_BODIES.items():
                paths[path][method]["requestBody"] = {
                    "required": True,
                    "content": _json_content(ref_of[body_type]),
                }
            for (path, method, status), body_type in _RESPONSE_BODIES.items():
                responses = paths[path][method].setdefault("responses", {})
                responses[status] = {
                    "description": body_type.__doc__ or body_type.__name__,
                    "content": _json_content(ref_of[body_type]),
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
