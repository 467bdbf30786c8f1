"""RFC 9457 problem details: every error the gateway answers is `application/problem+json`."""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from taskbus.contracts.redaction import redact

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:taskbus:problem:"

logger = logging.getLogger(__name__)


class Problem(Exception):
    """An error answer. `kind` names the problem type; `extensions` are extra members."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        *,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = _TYPE_PREFIX + kind if kind else "about:blank"
        self.title = title or _phrase(status)
        self.headers = headers
        self.extensions = extensions

    def body(self, instance: str) -> dict[str, Any]:
        """The problem document; a credential echoed from the request is masked."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": redact(self.detail),
            "instance": redact(instance),
            **self.extensions,
        }


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def unauthorized() -> Problem:
    return Problem(
        401,
        "a valid API key is required: Authorization: Bearer <key>",
        kind="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def conversation_not_found(conversation_id: str) -> Problem:
    # The same answer for unknown, malformed and other users' ids: existence is not disclosed.
    return Problem(404, f"conversation {conversation_id!r} not found", kind="not-found")


def content_too_large(max_bytes: int) -> Problem:
    return Problem(
        413,
        f"the request body is larger than {max_bytes} bytes",
        kind="content-too-large",
        title="Content too large",
        max_bytes=max_bytes,
    )


def rate_limited(retry_after_seconds: float, detail: str) -> Problem:
    """429 with Retry-After in whole seconds (at least 1)."""
    retry_after = max(1, math.ceil(retry_after_seconds))
    return Problem(
        429,
        detail,
        kind="rate-limited",
        title="Too many requests",
        headers={"Retry-After": str(retry_after)},
        retry_after_seconds=retry_after,
    )


def invalid_body(error: msgspec.DecodeError) -> Problem:
    """Malformed JSON is a 400; well-formed JSON of the wrong shape a 422 (msgspec tells which)."""
    if isinstance(error, msgspec.ValidationError):
        return Problem(422, str(error), kind="validation-error", title="Invalid request body")
    return Problem(400, f"malformed JSON: {error}", kind="malformed-json", title="Malformed JSON")


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


async def _on_problem(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, Problem)
    return problem_response(error, request)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first
    matching route's, and a path such as /api/conversations/{id} has a route per method."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    )


async def _on_http_exception(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own errors (unknown route 404, 405, ...) in the same shape."""
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    headers = dict(error.headers) if error.headers else None
    if error.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return problem_response(Problem(error.status_code, detail, headers=headers), request)


async def _on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type")}
        for item in error.errors()
    ]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    problem = Problem(422, detail, kind="validation-error", title="Invalid request", errors=errors)
    return problem_response(problem, request)


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(Problem(500, "internal error", kind="internal-error"), request)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
