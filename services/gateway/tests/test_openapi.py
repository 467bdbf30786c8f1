"""The OpenAPI document tells the whole truth: /docs and /redoc work offline, every operation,
parameter and field is described and exemplified (and the examples fit their schemas), the
event union is keyed on `kind` and matches what `/events` really serves, and the WebSocket
protocol is documented where the document points."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import pytest

from taskbus.contracts.events import EVENT_TYPES
from taskbus.gateway.websocket import SLOW_CONSUMER_CLOSE_CODE

from .test_rest import Headers, create

Document = dict[str, Any]
WEBSOCKET_DOC = Path(__file__).resolve().parents[3] / "docs" / "websocket.md"
GATEWAY = "http://gateway"


class _AssetUrls(HTMLParser):
    """Every URL a page makes the browser load: script sources and link hrefs."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src", "redoc": "spec-url"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


@pytest.fixture
async def document(client: httpx.AsyncClient) -> Document:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    body: Document = response.json()
    return body


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_every_asset_from_the_gateway(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    html = response.text
    parser = _AssetUrls()
    parser.feed(html)
    assert len(parser.urls) >= 3, parser.urls  # the UI's script, its favicon, the document
    for url in parser.urls:
        absolute = urljoin(f"{GATEWAY}{page}", url)
        assert urlsplit(absolute).netloc == "gateway", f"{page} loads {url} from elsewhere"
        asset = await client.get(absolute)
        assert asset.status_code == 200, url
        assert asset.content, url
    # Nor does any inline script or style name another host (a CDN, Google Fonts, Swagger
    # UI's online validator, which the bundle calls unless told not to).
    assert re.findall(r"https?://[^\s'\"<>]+", html) == []
    if page == "/docs":
        assert '"validatorUrl": null' in html


def _operations(document: Document) -> Iterator[tuple[str, str, Document]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def _undescribed(schema: Any, where: str) -> Iterator[str]:
    """Properties anywhere in a schema (nested, in unions, in items) without a description."""
    if isinstance(schema, dict):
        for name, property_schema in schema.get("properties", {}).items():
            if not property_schema.get("description"):
                yield f"{where}.{name}"
            yield from _undescribed(property_schema, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            yield from _undescribed(schema.get(key), f"{where}[]")
        for key in ("anyOf", "oneOf", "allOf"):
            for branch in schema.get(key, []):
                yield from _undescribed(branch, where)


def _validator(document: Document, schema: Document) -> jsonschema.Draft202012Validator:
    """A validator of `schema` whose `#/components/...` references resolve in the document."""
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


async def test_every_operation_is_summarised_described_and_exemplified(
    document: Document,
) -> None:
    missing: list[str] = []
    for path, method, operation in _operations(document):
        name = f"{method.upper()} {path}"
        for key in ("summary", "description"):
            if not operation.get(key, "").strip():
                missing.append(f"{name}: no {key}")
        for parameter in operation.get("parameters", []):
            if not parameter.get("description"):
                missing.append(f"{name}: parameter {parameter['name']} undescribed")
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            if "example" not in body:
                missing.append(f"{name}: no request example")
            else:
                _validator(document, body["schema"]).validate(body["example"])
        success = min(status for status in operation["responses"] if status.startswith("2"))
        content = operation["responses"][success].get("content", {})
        answer = content.get("application/json") or next(iter(content.values()), {})
        if "example" not in answer:
            missing.append(f"{name}: no example of its {success} answer")
        elif answer.get("schema"):
            _validator(document, answer["schema"]).validate(answer["example"])
    assert missing == []


async def test_every_parameter_and_field_is_described(document: Document) -> None:
    undescribed = [
        where
        for name, schema in document["components"]["schemas"].items()
        for where in _undescribed(schema, name)
    ]
    for path, method, operation in _operations(document):
        body = operation.get("requestBody", {}).get("content", {})
        for media in body.values():
            undescribed += _undescribed(media["schema"], f"{method.upper()} {path} body")
        for status, response in operation["responses"].items():
            for media in response.get("content", {}).values():
                where = f"{method.upper()} {path} {status}"
                undescribed += _undescribed(media.get("schema", {}), where)
    assert undescribed == []


async def test_the_event_union_is_keyed_on_kind_over_every_event_type(
    document: Document,
) -> None:
    schemas = document["components"]["schemas"]
    union = schemas["Event"]
    assert union["discriminator"]["propertyName"] == "kind"
    assert set(union["discriminator"]["mapping"]) == set(EVENT_TYPES)
    assert len(union["oneOf"]) == len(EVENT_TYPES)
    for kind in EVENT_TYPES:
        assert schemas[kind]["properties"]["kind"]["const"] == kind
    page = schemas["EventPage"]["properties"]["events"]["items"]
    assert page == {"$ref": "#/components/schemas/Event"}
    events = document["paths"]["/api/conversations/{conversation_id}/events"]["get"]
    assert events["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EventPage"
    }


async def test_served_events_fit_the_union_and_wrong_ones_do_not(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    event_store: Any,
    document: Document,
) -> None:
    cid = await create(client, alice, title="t")
    await session_manager.say(cid, "hello")
    response = await client.get(f"/api/conversations/{cid}/events", headers=alice)
    assert response.status_code == 200
    page = response.json()
    assert {event["kind"] for event in page["events"]} >= {"ConversationCreated", "MessageAction"}
    _validator(document, {"$ref": "#/components/schemas/EventPage"}).validate(page)
    one = await client.get(f"/api/conversations/{cid}/events/0", headers=alice)
    union = _validator(document, {"$ref": "#/components/schemas/Event"})
    union.validate(one.json())
    message = next(event for event in page["events"] if event["kind"] == "MessageAction")
    wrong = [
        {**message, "kind": "NoSuchKind"},  # a kind the union does not know
        {**message, "kind": "CmdOutputObservation"},  # an action dressed as an observation
        {key: value for key, value in message.items() if key != "args"},  # no args
        {key: value for key, value in message.items() if key != "id"},  # no envelope id
    ]
    for event in wrong:
        assert not union.is_valid(event), event


async def test_the_websocket_protocol_is_documented_and_linked(document: Document) -> None:
    assert "docs/websocket.md" in document["info"]["description"]
    events = document["paths"]["/api/conversations/{conversation_id}/events"]["get"]
    assert "docs/websocket.md" in events["description"]
    text = WEBSOCKET_DOC.read_text()
    for needle in (
        "/api/conversations/{conversation_id}/events",
        "after_id",
        "heartbeat",
        *(f'"{action}"' for action in ("message", "pause", "resume", "stop", "confirm")),
        '"reject"',
        "command_refused",
        "invalid_message",
        str(SLOW_CONSUMER_CLOSE_CODE),
        "1008",
        "429",
        "ws_max_per_user",
    ):
        assert needle in text, needle


async def test_every_operation_with_a_body_declares_its_body_problems(document: Document) -> None:
    """A malformed or oversized body is answered 400 / 413 problems by every such operation
    (PATCH included: schemathesis found PATCH's 400 undeclared)."""
    for path, method, operation in _operations(document):
        if "requestBody" in operation:
            for status in ("400", "413", "422"):
                content = operation["responses"][status]["content"]
                assert "application/problem+json" in content, (method, path, status)
