"""POST message -> WebSocket at 50 clients (issue 13, item 4), beside the core NATS request
floor of the same run.

    uv run python bench/post_to_websocket.py [--clients 50] [--messages 20]

`taskbus up` (local backend) in a temp dir; `--clients` conversations, each waiting for its user
with a WebSocket open on it; every client POSTs `/message` once a second (the clients spread
over the second) and times each POST until its MessageAction arrives on its WebSocket. The
references, in the same run: a core NATS request-reply round trip on the stack's server, and
the HTTP floor: the same client's POST /message that the gateway refuses before the bus (422,
an empty body), through the same server, middlewares and key check.
Target: p50 <= 3 ms, p99 <= 25 ms. (The appender's half of the hot path: appender_bench.py.)

The timed POSTs go out on a keep-alive HTTP/1.1 connection per client, written and read by hand
(`KeepAlivePost`), as a browser's or a Go client's would: httpx spends about 0.3 ms of CPU
before a request reaches the socket and as much after its answer, in the same process as the
WebSockets it timed, which measured the client library rather than the service.

Where the time goes: a tap on the bus sees each SendMessage command and its MessageAction as
they pass, which splits every sample into the gateway's two hops (POST -> command on the bus,
with the client's own send; event on the bus -> WebSocket frame) and the rest (command ->
event: session-manager and the log). On a shared machine these wall-clock figures mostly
measure the wait for a CPU, so each process's CPU milliseconds per message are printed too:
they tell cost, not luck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect as bus_connect
from taskbus.contracts.bus import inbox_prefix
from taskbus.contracts.commands import SendMessage, decode_command
from taskbus.contracts.events import EventSource, MessageAction, decode_event
from taskbus.devtools.local_stack import read_state

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stack the tests start
from throughput import cpu_by_process

from tests.conftest import Stack, running_stack

TARGET_P50_MS, TARGET_P99_MS = 3.0, 25.0
# The model answers the first message, then never again: the conversations wait for their user
# and every later message only travels gateway -> session-manager -> log -> WebSocket.
SILENT_MODEL_SCRIPT = {
    "steps": [
        {"content": "Noted. What next?"},
        {"content": "(never said)", "delay": {"seconds": 3600}},
    ]
}
POST_PERIOD_SECONDS = 1.0  # each client posts once a second: 50 messages/s at 50 clients
HOPS = (
    "POST -> command (gateway)",
    "command -> event (session-manager)",
    "event -> frame (gateway)",
)


class Sample(msgspec.Struct):
    """One message to `conversation_id`: when it was POSTed and framed, and when the tap saw its
    SendMessage command and its MessageAction event pass on the bus (0: not seen)."""

    conversation_id: str
    posted: float
    framed: float = 0.0
    command: float = 0.0
    event: float = 0.0

    def hops(self) -> tuple[float, float, float]:
        return self.command - self.posted, self.event - self.command, self.framed - self.event


class KeepAlivePost:
    """POSTs of JSON over one keep-alive HTTP/1.1 connection, one at a time: the request written
    in one piece, the answer read by its Content-Length (the gateway always sends one)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes):
        self._reader, self._writer, self._head = reader, writer, head

    @classmethod
    async def open(cls, stack: Stack) -> KeepAlivePost:
        url = urlsplit(stack.url)
        assert url.hostname is not None and url.port is not None, stack.url
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        headers = {**stack.headers, "Host": url.netloc, "Content-Type": "application/json"}
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
        return cls(reader, writer, head)

    async def post(self, path: str, body: object) -> tuple[int, bytes]:
        """The answer's status and body."""
        self.send(path, body)
        return await self.answer()

    def send(self, path: str, body: object) -> None:
        """Write the request: it is on its way when this returns."""
        data = json.dumps(body).encode()
        self._writer.write(
            b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self._head, len(data), data)
        )

    async def answer(self) -> tuple[int, bytes]:
        """The status and body of the answer to the request sent last."""
        status_line, *header_lines = (await self._reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        lengths = [
            int(line.split(b":", 1)[1])
            for line in header_lines
            if line.lower().startswith(b"content-length:")
        ]
        assert len(lengths) == 1, f"an answer without one Content-Length: {header_lines}"
        return int(status_line.split()[1]), await self._reader.readexactly(lengths[0])

    async def aclose(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def frame_saying(ws: ClientConnection, text: str, wait_seconds: float = 60) -> None:
    """Read the WebSocket until a user MessageAction saying `text` arrives."""
    async with asyncio.timeout(wait_seconds):  # not wait_for: a task (and a turn) per frame
        while True:
            event = json.loads(await ws.recv())
            if event.get("source") == "user" and event.get("message") == text:
                return


async def waiting_for_input(api: httpx.AsyncClient, cid: str) -> None:
    """Until the agent has answered the first message and waits for the user."""
    info = {}
    for _ in range(600):
        info = (await api.get(f"/api/conversations/{cid}")).json()
        if info.get("agent_state") == "awaiting_user_input":
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{cid} never waited for input: {info}")


async def post_to_websocket(
    stack: Stack, clients: int, messages: int
) -> tuple[list[Sample], dict[str, float]]:
    """Each POST /message until its MessageAction reaches the client's socket, each client
    posting every POST_PERIOD_SECONDS, the clients spread over the period; and the CPU
    milliseconds each kind of process spent per message meanwhile."""
    async with stack.client() as api:
        settings = {"max_concurrent_conversations": clients}
        assert (await api.put("/api/settings", json=settings)).status_code == 200
        cids = []
        for n in range(clients):
            answer = await api.post("/api/conversations", json={"initial_user_msg": f"{n}"})
            assert answer.status_code in (200, 201), answer.text
            cids.append(answer.json()["conversation_id"])
        await asyncio.gather(*(waiting_for_input(api, cid) for cid in cids))
        samples: dict[tuple[str, str], Sample] = {}

        async def client(n: int, cid: str) -> None:
            url = f"{stack.ws_url}/api/conversations/{cid}/events?after_id=-1"
            async with (
                contextlib.aclosing(await KeepAlivePost.open(stack)) as http,
                connect(url, additional_headers=stack.headers) as ws,
            ):
                await frame_saying(ws, f"{n}")  # the history is replayed
                await asyncio.sleep(n * POST_PERIOD_SECONDS / clients)
                for m in range(messages):
                    text = f"message {m}"
                    sample = samples[cid, text] = Sample(cid, posted=time.perf_counter())
                    http.send(f"/api/conversations/{cid}/message", {"message": text})
                    answered = asyncio.create_task(http.answer())
                    await frame_saying(ws, text)
                    sample.framed = time.perf_counter()
                    status, answer = await answered
                    assert status == 202, answer
                    pause = sample.posted + POST_PERIOD_SECONDS - time.perf_counter()
                    await asyncio.sleep(max(0, pause))

        state = read_state(stack.data_dir)
        assert state is not None, "taskbus up wrote no state"
        async with tap_on_the_bus(stack, samples):
            before = cpu_by_process(state.pid)
            await asyncio.gather(*(client(n, cid) for n, cid in enumerate(cids)))
            after = cpu_by_process(state.pid)
        cpu = {
            name: 1000 * (used - before.get(name, 0.0)) / len(samples)
            for name, used in after.items()
        }
        return list(samples.values()), cpu


@contextlib.asynccontextmanager
async def tap_on_the_bus(
    stack: Stack, samples: dict[tuple[str, str], Sample]
) -> AsyncIterator[None]:
    """Stamp each sample when its SendMessage and its MessageAction pass on the bus."""
    nc = await bus_connect(stack.nats_url, "bench-tap", stack.bus_credential("admin"))

    def seen(conversation_id: str, text: str) -> Sample | None:
        return samples.get((conversation_id, text))

    async def command(msg: Msg) -> None:
        now, sent = time.perf_counter(), decode_command(msg.data)
        if isinstance(sent, SendMessage) and (sample := seen(sent.conversation_id, sent.content)):
            sample.command = sample.command or now

    async def event(msg: Msg) -> None:
        now, said = time.perf_counter(), decode_event(msg.data)
        if not isinstance(said, MessageAction) or said.source != EventSource.USER:
            return
        if sample := seen(said.conversation_id, said.content):
            sample.event = sample.event or now

    await nc.subscribe(subjects.SESSION_MANAGER_COMMANDS, cb=command)
    await nc.subscribe(subjects.events_of_kind(MessageAction.__name__), cb=event)
    try:
        yield
    finally:
        await nc.drain()


async def request_floor(stack: Stack, count: int = 1000) -> list[float]:
    """Core NATS request-reply round trips on the stack's server, one after another."""
    nc = await bus_connect(stack.nats_url, "bench", stack.bus_credential("admin"))
    subject = f"{inbox_prefix('admin')}.bench.echo"

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await nc.request(subject, b"ping", timeout=5)
        samples.append(time.perf_counter() - started)
    await nc.drain()
    return samples


async def http_floor(stack: Stack, conversation_id: str, count: int = 1000) -> list[float]:
    """Round trips of a POST /message the gateway refuses before the bus, one after another."""
    samples = []
    async with contextlib.aclosing(await KeepAlivePost.open(stack)) as http:
        for _ in range(count):
            started = time.perf_counter()
            status, answer = await http.post(f"/api/conversations/{conversation_id}/message", {})
            samples.append(time.perf_counter() - started)
            assert status == 422, answer
    return samples


async def websocket_latency(clients: int, messages: int) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_stack(
            Path(tmp),
            SILENT_MODEL_SCRIPT,
            TASKBUS_MAX_CONCURRENT_CONVERSATIONS_LIMIT=str(clients),
            TASKBUS_MAX_RUNNING=str(clients),
            TASKBUS_RUNNER_SLOTS=str(clients),
            TASKBUS_RUNNER_MAX_SANDBOXES=str(clients),
            TASKBUS_CREATE_BURST=str(clients),
            TASKBUS_WS_MAX_PER_USER=str(clients),
            TASKBUS_BACKEND="local",
        ) as stack,
    ):
        samples, cpu = await post_to_websocket(stack, clients, messages)
        floor = await request_floor(stack)
        refused = await http_floor(stack, samples[0].conversation_id)
    p50, p99 = percentiles([s.framed - s.posted for s in samples])
    print(f"\nPOST message -> WebSocket, {clients} clients x {messages} messages")
    print(f"{'':36}{'p50 ms':>9}{'p99 ms':>9}{'target':>13}")
    for name, reference in (
        ("core NATS request", floor),
        ("HTTP floor, 422 POST", refused),
    ):
        floor_p50, floor_p99 = percentiles(reference)
        print(f"{name + ' (reference)':36}{floor_p50:>9.2f}{floor_p99:>9.2f}")
    print(
        f"{'POST -> WS':36}{p50:>9.2f}{p99:>9.2f}{f'<= {TARGET_P50_MS:g} / {TARGET_P99_MS:g}':>13}"
    )
    seen = [s for s in samples if s.command and s.event]  # the tap saw both (it may drop some)
    for name, hop in zip(HOPS, zip(*(s.hops() for s in seen), strict=True), strict=True):
        hop_p50, hop_p99 = percentiles(list(hop))
        print(f"{'  ' + name:36}{hop_p50:>9.2f}{hop_p99:>9.2f}")
    print("CPU ms per message:")
    for name, milliseconds in sorted(cpu.items(), key=lambda item: -item[1]):
        if milliseconds >= 0.05:
            print(f"  {name:34}{milliseconds:>9.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--messages", type=int, default=20)
    options = parser.parse_args()
    await websocket_latency(options.clients, options.messages)


if __name__ == "__main__":
    asyncio.run(main())
