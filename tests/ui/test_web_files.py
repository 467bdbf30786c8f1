"""The UI's files as the gateway serves them, CORS for configured origins only, and the wheel
carrying the UI (no NATS needed: the app answers these without its lifespan)."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from taskbus.contracts.status import COMMAND_TRANSITIONS
from taskbus.gateway.app import create_app
from taskbus.gateway.settings import GatewaySettings
from taskbus.gateway.web_ui import WEB_DIR

ALLOWED = "https://ops.example.com"
OTHER = "https://evil.example.net"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def gateway() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(cors_origins=f" {ALLOWED} ,http://localhost:5173"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


async def test_the_page_and_its_files_are_served_with_a_strict_policy(
    gateway: httpx.AsyncClient,
) -> None:
    page = await gateway.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="ui/app.js">' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "api.js", "render.js"):
        script = await gateway.get(f"/ui/{name}")
        assert script.status_code == 200, name
        assert "javascript" in script.headers["content-type"]
        assert script.headers["content-security-policy"] == policy
    assert (await gateway.get("/ui/style.css")).headers["content-type"].startswith("text/css")
    assert (await gateway.get("/ui/../settings.py")).status_code == 404
    assert (await gateway.get("/ui/missing.js")).status_code == 404


async def test_the_page_reads_the_contracts_command_table(gateway: httpx.AsyncClient) -> None:
    table = (await gateway.get("/ui/commands.json")).json()
    assert table == {
        control.value: sorted(statuses) for control, statuses in COMMAND_TRANSITIONS.items()
    }
    assert "FINISHED" not in table["pause"] and "PAUSED" in table["resume"]


def test_no_event_data_is_ever_parsed_as_html() -> None:
    """The rendering rule of render.js, kept for every script: no HTML sink at all."""
    for script in WEB_DIR.glob("*.js"):
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{script.name} uses {sink}"


async def test_cors_answers_configured_origins_only(gateway: httpx.AsyncClient) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    allowed = await gateway.options("/api/conversations", headers={"Origin": ALLOWED, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers

    refused = await gateway.options("/api/conversations", headers={"Origin": OTHER, **preflight})
    assert "access-control-allow-origin" not in refused.headers

    # A simple request: the allowed origin may read the answer (here a 401 problem), the other
    # origin's page gets no header, so its browser withholds the answer.
    read = await gateway.get("/api/conversations", headers={"Origin": ALLOWED})
    assert read.status_code == 401
    assert read.headers["access-control-allow-origin"] == ALLOWED
    other = await gateway.get("/api/conversations", headers={"Origin": OTHER})
    assert "access-control-allow-origin" not in other.headers


async def test_no_cors_unless_configured() -> None:
    app = create_app(GatewaySettings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        answer = await client.get("/", headers={"Origin": ALLOWED})
        assert answer.status_code == 200
        assert "access-control-allow-origin" not in answer.headers


def test_the_wheel_carries_the_ui(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    assert uv is not None, "uv builds the wheel (as CI installs it)"
    subprocess.run(
        [uv, "build", "--package", "taskbus-gateway", "--wheel", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("taskbus_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {
            Path(name).name: archive.read(name)
            for name in archive.namelist()
            if name.startswith("taskbus/gateway/web/") and not name.endswith("/")
        }
    assert packaged == {path.name: path.read_bytes() for path in WEB_DIR.iterdir()}
