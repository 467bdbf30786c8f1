"""The web UI: static files of this package (web/), no build step and no CDN.

`/` is the page and `/ui/*` its scripts and styles; `/ui/commands.json` is the contracts' table
of which command each status allows, so the page enables only the buttons that can succeed
without spelling the table out a second time. The page talks only to the public API, with
the API key in an `Authorization` header; its Content-Security-Policy allows scripts, styles,
images and requests of this origin only, so even a rendering slip could not load or run
anything else (the scripts never parse event text as HTML: tests/ui show it).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.responses import Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from taskbus.contracts.status import COMMAND_TRANSITIONS

WEB_DIR = Path(__file__).parent / "web"
UI_PREFIX = "/ui"

_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each load (ETag), so a new gateway version's scripts are never mixed with old.
    "Cache-Control": "no-cache",
}


class _UiFiles(StaticFiles):
    """StaticFiles with the UI's headers on every file."""

    def file_response(
        self,
        full_path: PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_HEADERS)
        return response


def install_web_ui(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/ui/`."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=_HEADERS)

    commands = {
        control.value: sorted(statuses) for control, statuses in COMMAND_TRANSITIONS.items()
    }

    @app.get(f"{UI_PREFIX}/commands.json", include_in_schema=False)
    async def allowed_commands() -> JSONResponse:
        """The statuses from which each command is accepted (contracts/status.py)."""
        return JSONResponse(commands, headers=_HEADERS)

    app.mount(UI_PREFIX, _UiFiles(directory=WEB_DIR), name="ui")
