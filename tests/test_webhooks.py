"""Webhooks against a real stack: signed deliveries of a task's status changes through FINISHED,
retries with their attempts logged, no redirect followed, SSRF refusals, and one user's
webhooks out of another's reach.

The receiver is a real HTTP server in this process, on loopback: the operator allows exactly
its address by IP (`TASKBUS_WEBHOOK_ALLOWED_PRIVATE_URLS`), as for a private LLM endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.llm_endpoints import AllowList, EndpointRefused, check_open_destination
from taskbus.contracts.webhooks import AttemptOutcome, outcome_of, retry_delay, user_key
from taskbus.devtools.launcher import LOCAL_USER

from .conftest import Stack, running_stack

pytestmark = pytest.mark.slow

FINISH = {"steps": [{"tool_calls": [{"name": "finish", "arguments": {"message": "Done."}}]}]}
MALLORY_KEY = "tb_mallory_webhooks_test_key"
WAIT_SECONDS = 90.0
PROBLEM = "application/problem+json"


class Received(msgspec.Struct, frozen=True):
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


class Receiver:
    """Records every request; answers by path: /ok 200, /flaky 500 twice per delivery then
    200, /gone 410, /redirect 302 to /trap (which must never be reached)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received = Received(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                with receiver._lock:
                    receiver.requests.append(received)
                    tries = sum(
                        1
                        for r in receiver.requests
                        if r.path == "/flaky"
                        and r.headers.get("x-taskbus-delivery")
                        == received.headers.get("x-taskbus-delivery")
                    )
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"{receiver.url}/trap")
                else:
                    code = {"/ok": 200, "/gone": 410, "/flaky": 500 if tries <= 2 else 200}
                    self.send_response(code.get(self.path, 404))
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def at(self, path: str, conversation_id: str | None = None) -> list[Received]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path == path
                and (conversation_id is None or r.payload["conversation_id"] == conversation_id)
            ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("webhooks"),
        script=FINISH,
        TASKBUS_API_KEYS=f"{MALLORY_KEY}=mallory",
        TASKBUS_WEBHOOK_ALLOWED_PRIVATE_URLS=receiver.url,
        TASKBUS_WEBHOOK_RETRY_SECONDS="0.2",
        TASKBUS_WEBHOOK_MAX_ATTEMPTS="4",
    ) as running:
        yield running


async def until(condition: Callable[[], Any], what: str, seconds: float = WAIT_SECONDS) -> Any:
    """`condition()`'s first truthy value (awaited if it is a coroutine function's)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def register(api: httpx.AsyncClient, url: str, **body: Any) -> dict[str, Any]:
    response = await api.post("/api/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def finished_conversation(api: httpx.AsyncClient) -> str:
    response = await api.post("/api/conversations", json={"initial_user_msg": "Say done."})
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]

    async def finished() -> bool:
        answer = await api.get(f"/api/conversations/{cid}")
        return bool(answer.json()["taskbus_status"] == "FINISHED")

    await until(finished, f"{cid} to finish")
    return cid


async def deliveries(api: httpx.AsyncClient, webhook_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["deliveries"]
    return found


def signed_by(secret: str, request: Received) -> bool:
    """The receiver's check, written from the documented scheme (not the server's code)."""
    expected = "sha256=" + hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, request.headers["x-taskbus-signature"])


async def test_a_receiver_gets_signed_deliveries_of_each_status_change_through_finished(
    stack: Stack, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook = await register(api, f"{receiver.url}/ok")
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert hook["events"] == ["conversation.finished", "conversation.status_changed"]
    listed = await api.get("/api/webhooks")
    assert [h["id"] for h in listed.json()["webhooks"]] == [hook["id"]]
    assert secret not in listed.text and "secret" not in listed.json()["webhooks"][0]

    cid = await finished_conversation(api)
    await until(
        lambda: any(r.payload["status"] == "FINISHED" for r in receiver.at("/ok", cid)),
        "the FINISHED delivery",
    )
    received = sorted(receiver.at("/ok", cid), key=lambda r: r.payload["event_id"])
    statuses = [r.payload["status"] for r in received]
    assert statuses[0] in ("QUEUED", "STARTING") and "RUNNING" in statuses
    assert statuses[-1] == "FINISHED"
    for request in received:
        body = request.payload
        assert signed_by(secret, request)
        assert not signed_by(secret, msgspec.structs.replace(request, body=request.body + b" "))
        assert not signed_by("whsec_" + "x" * 43, request)
        assert request.headers["x-taskbus-delivery"] == body["delivery_id"]
        sent_at = datetime.fromisoformat(body["sent_at"])
        assert request.headers["x-taskbus-timestamp"] == str(int(sent_at.timestamp()))
        assert abs(time.time() - sent_at.timestamp()) < 600  # what a receiver checks
        finished = body["status"] == "FINISHED"
        assert body["event"] == (
            "conversation.finished" if finished else "conversation.status_changed"
        )
        assert request.headers["x-taskbus-event"] == body["event"]
    assert len({r.headers["x-taskbus-delivery"] for r in received}) == len(received)

    log = await until(lambda: _delivered(api, hook["id"], cid, len(received)), "the delivery log")
    assert all([a["status_code"] for a in d["attempts"]] == [200] for d in log)

    # The secret is nowhere but in the creation answer: not in any log, nor in the bucket,
    # which holds it sealed.
    for path in stack.data_dir.rglob("*.log"):
        assert secret not in path.read_text(errors="replace"), path
    nc = await connect(stack.nats_url, "webhooks-test", stack.bus_credential("admin"))
    try:
        bucket = await nc.jetstream().key_value(subjects.WEBHOOKS_BUCKET)
        entry = await bucket.get(user_key(LOCAL_USER))
    finally:
        await nc.close()
    assert entry.value is not None and hook["id"].encode() in entry.value
    assert secret.encode() not in entry.value and b"sealed:v1:" in entry.value


async def _delivered(
    api: httpx.AsyncClient, webhook_id: str, cid: str, count: int
) -> list[dict[str, Any]] | None:
    log = [d for d in await deliveries(api, webhook_id) if d["conversation_id"] == cid]
    done = len(log) == count and all(d["outcome"] == "delivered" for d in log)
    return log if done else None


async def test_a_failing_receiver_gets_retries_and_redirects_are_not_followed(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    finished_only = {"events": ["conversation.finished"]}
    flaky = await register(api, f"{receiver.url}/flaky", **finished_only)
    gone = await register(api, f"{receiver.url}/gone", **finished_only)
    redirect = await register(api, f"{receiver.url}/redirect", **finished_only)
    cid = await finished_conversation(api)

    async def settled(webhook_id: str, outcome: str) -> dict[str, Any] | None:
        log = [d for d in await deliveries(api, webhook_id) if d["conversation_id"] == cid]
        return log[0] if log and log[0]["outcome"] == outcome else None

    retried = await until(lambda: settled(flaky["id"], "delivered"), "the retried delivery")
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in retried["attempts"]] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 200, "delivered"),
    ]
    tries = receiver.at("/flaky", cid)
    assert len(tries) == 3  # only the finish: the filter holds back the other changes
    assert {r.headers["x-taskbus-delivery"] for r in tries} == {retried["delivery_id"]}
    assert all(r.payload["event"] == "conversation.finished" for r in tries)
    assert all(signed_by(flaky["secret"], r) for r in tries)
    assert not any(signed_by(gone["secret"], r) for r in tries)

    given_up = await until(lambda: settled(gone["id"], "failed"), "the 410 to be given up")
    assert [(a["status_code"], a["outcome"]) for a in given_up["attempts"]] == [(410, "failed")]
    assert len(receiver.at("/gone", cid)) == 1

    moved = await until(lambda: settled(redirect["id"], "failed"), "the redirect's outcome")
    assert [(a["status_code"], a["outcome"]) for a in moved["attempts"]] == [(302, "failed")]
    assert receiver.at("/trap") == []


async def test_loopback_private_and_metadata_urls_are_refused(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    before = (await api.get("/api/webhooks")).json()["webhooks"]
    refused = [
        "http://127.0.0.1:1/hook",  # loopback, not the address the operator listed
        f"http://localhost:{port}/ok",  # the listed address, but by a name
        f"http://[::ffff:127.0.0.1]:{port}/ok",  # the listed address, IPv4-mapped
        f"http://[::1]:{port}/ok",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.7:8080/hook",
        "http://192.168.1.1/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",  # CGNAT
        f"{receiver.url}/ok?token=abc",  # a query (where credentials hide)
        f"http://user:pw@127.0.0.1:{port}/ok",
        "ftp://ftp.example.com/hook",
        "file:///etc/passwd",
    ]
    for url in refused:
        response = await api.post("/api/webhooks", json={"url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.headers["content-type"] == PROBLEM
    malformed = await api.post("/api/webhooks", json={"url": receiver.url, "events": ["x"]})
    assert malformed.status_code == 422
    assert (await api.get("/api/webhooks")).json()["webhooks"] == before


async def test_another_user_can_neither_see_nor_delete_your_webhook(
    stack: Stack, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook = await register(api, f"{receiver.url}/ok")
    async with stack.client(MALLORY_KEY) as mallory:
        assert hook["id"] not in (await mallory.get("/api/webhooks")).text
        for method, path in [
            ("GET", f"/api/webhooks/{hook['id']}/deliveries"),
            ("DELETE", f"/api/webhooks/{hook['id']}"),
        ]:
            response = await mallory.request(method, path)
            assert response.status_code == 404, (method, response.text)
            assert response.headers["content-type"] == PROBLEM
    async with httpx.AsyncClient(base_url=stack.url) as anonymous:
        assert (await anonymous.get("/api/webhooks")).status_code == 401
    assert hook["id"] in (await api.get("/api/webhooks")).text  # still there

    deleted = await api.delete(f"/api/webhooks/{hook['id']}")
    assert deleted.status_code == 200, deleted.text
    assert hook["id"] not in (await api.get("/api/webhooks")).text
    assert (await api.delete(f"/api/webhooks/{hook['id']}")).status_code == 404
    assert (await api.get(f"/api/webhooks/{hook['id']}/deliveries")).status_code == 404
    assert (await api.get("/api/webhooks/not-an-id/deliveries")).status_code == 422


async def test_a_user_registers_at_most_ten_webhooks_and_others_are_not_held_to_theirs(
    stack: Stack, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Each registered webhook is work for every status change: the cap bounds what one user
    makes the gateway deliver, and it is per user."""
    async with stack.client(MALLORY_KEY) as mallory:
        hooks = [await register(mallory, f"{receiver.url}/cap/{n}") for n in range(10)]
        refused = await mallory.post("/api/webhooks", json={"url": f"{receiver.url}/cap/10"})
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == PROBLEM
        assert "at most 10 webhooks" in refused.json()["detail"]
        listed = (await mallory.get("/api/webhooks")).json()["webhooks"]
        assert sorted(h["id"] for h in listed) == sorted(h["id"] for h in hooks)
        mine = await register(api, f"{receiver.url}/cap/other-user")  # not held to mallory's
        assert (await api.delete(f"/api/webhooks/{mine['id']}")).status_code == 200
        # One given back makes room for one more.
        assert (await mallory.delete(f"/api/webhooks/{hooks[0]['id']}")).status_code == 200
        await register(mallory, f"{receiver.url}/cap/10")
        for hook in (await mallory.get("/api/webhooks")).json()["webhooks"]:
            assert (await mallory.delete(f"/api/webhooks/{hook['id']}")).status_code == 200


def test_which_answers_are_retried_and_how_long_the_waits_grow() -> None:
    assert outcome_of(204, 1, 4) is AttemptOutcome.DELIVERED
    for retried in (None, 408, 429, 500, 503):
        assert outcome_of(retried, 3, 4) is AttemptOutcome.RETRYING, retried
        assert outcome_of(retried, 4, 4) is AttemptOutcome.FAILED, retried  # the last attempt
    for given_up in (301, 302, 400, 401, 404, 410, 422):
        assert outcome_of(given_up, 1, 4) is AttemptOutcome.FAILED, given_up
    assert [retry_delay(n, 10, 600) for n in (1, 2, 3, 7, 8)] == [10, 20, 40, 600, 600]


async def test_a_listed_private_address_is_allowed_only_as_listed() -> None:
    listed = AllowList("http://10.0.0.7:8080/hooks")
    assert await check_open_destination("http://10.0.0.7:8080/hooks/ci", listed) == [
        ipaddress.ip_address("10.0.0.7")
    ]
    for url in (
        "http://10.0.0.7:8081/hooks",  # another port
        "http://10.0.0.7:8080/other",  # another path
        "https://10.0.0.7:8080/hooks",  # another scheme
        "http://10.0.0.8:8080/hooks",
    ):
        with pytest.raises(EndpointRefused):
            await check_open_destination(url, listed)
    with pytest.raises(EndpointRefused):  # a name IDNA cannot encode: refused, never a 500
        await check_open_destination("http://a..b/hook", AllowList(""))
    public = await check_open_destination("https://93.184.215.14/hook", AllowList(""))
    assert public == [ipaddress.ip_address("93.184.215.14")]
