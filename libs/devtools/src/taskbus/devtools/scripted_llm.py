"""A scripted stand-in for an LLM, speaking the OpenAI chat-completions protocol over HTTP.

No LLM is reachable from the machines Taskbus is built on, so tests and the offline demo talk to
this server instead (litellm reaches it as `openai/scripted` with `api_base`). It plays a script
and keeps no conversation state, so any number of conversations (and restarts) can share one
server: the step answered follows the last step the request's history shows. Tool call ids name
their step (`call_s<step>_<n>`), so the step is one past the last assistant message carrying such
an id, plus one per assistant message after it; with no such id, the number of assistant
messages. A condensed history (middle dropped) therefore still continues the script.

A step is `{"content": ..., "tool_calls": [{"name": ..., "arguments": {...}}]}`, optionally with
`"usage": {"prompt_tokens": P, "completion_tokens": C}` (pinned token counts, so a test can make
every call cost an exact amount; otherwise about four characters per token) and
`"error": {"status": 429|503|401, "times": N}`: the first N attempts of that exact request fail
with that status (N omitted = always), later attempts get the step's answer; and
`"delay": {"seconds": S, "times": N}`: the first N attempts (N omitted = all) are answered only
after S seconds (at once if the server stops first): a model that accepts and hangs. A 401
echoes the bearer token it got, as careless providers do, so tests can prove the caller never
repeats it.
Every request is logged in `ScriptPlayer.requests` for tests. Every answer says it comes from a
scripted model (`model`, `system_fingerprint` and the `X-Taskbus-Scripted-Model` header).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

MODEL_NAME = "scripted"
SYSTEM_FINGERPRINT = "taskbus-scripted-model"
SCRIPTED_HEADER = "X-Taskbus-Scripted-Model"
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
EXHAUSTED_MESSAGE = "The scripted model has no more steps in its script."


class ScriptedToolCall(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: dict[str, Any] = {}


class ScriptedError(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    status: int
    times: int | None = None  # None: fail every time
    message: str = ""


class ScriptedDelay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seconds: float
    times: int | None = None  # None: every attempt waits


class ScriptedUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prompt_tokens: int
    completion_tokens: int


class ScriptStep(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    content: str | None = None
    tool_calls: list[ScriptedToolCall] = []
    error: ScriptedError | None = None
    delay: ScriptedDelay | None = None
    usage: ScriptedUsage | None = None


class ScriptedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the scripted model saw it, and what it answered."""

    step: int
    status: int
    body: dict[str, Any]
    response: dict[str, Any]
    authorization: str | None


class Script(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    steps: list[ScriptStep]
    description: str = ""
    # Each answer is sent this long after its request arrived: a real model's latency, so a
    # bench measures the services around it (bench/scale.py).
    latency_seconds: float = 0.0


def demo_script_path() -> Path:
    """The default script shipped with the package: plan, run, edit, finish."""
    return Path(str(resources.files("taskbus.devtools") / "scripts" / "demo.json"))


def load_script(source: Path | str | Mapping[str, Any] | Script | None = None) -> Script:
    """A script from a file path, a dict, or (None) the packaged demo."""
    if isinstance(source, Script):
        return source
    if source is None:
        source = demo_script_path()
    if isinstance(source, Mapping):
        return msgspec.convert(source, Script)
    return msgspec.json.decode(Path(source).read_bytes(), type=Script)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _approximate_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: about four characters per token."""
    return max(1, len(text) // 4)


_STEP_OF_CALL_ID = re.compile(r"^call_s(\d+)_\d+$")


def step_of(messages: list[Any]) -> int:
    """The script step a request asks for, from the steps its history shows (see the module)."""
    assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    for position in range(len(assistants) - 1, -1, -1):
        for call in assistants[position].get("tool_calls") or []:
            match = _STEP_OF_CALL_ID.match(str(call.get("id", "")))
            if match:
                return int(match.group(1)) + len(assistants) - position
    return len(assistants)


class ScriptPlayer:
    """Answers chat-completion requests from a script; thread-safe."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[ScriptedRequest] = []
        self._attempts: dict[str, int] = {}
        self._delays: dict[str, int] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()  # set on stop: delayed answers go out at once

    def release(self) -> None:
        """Stop holding delayed answers (the server is stopping)."""
        self._released.set()

    def answer(
        self, request: Mapping[str, Any], authorization: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Return (HTTP status, JSON body) for one request body, and log the exchange."""
        messages = request.get("messages")
        if not isinstance(messages, list):
            return _error_body(HTTPStatus.BAD_REQUEST, "messages must be a list")
        if request.get("stream"):
            return _error_body(HTTPStatus.BAD_REQUEST, "the scripted model does not stream")
        step_index = step_of(messages)
        if self.script.latency_seconds:
            time.sleep(self.script.latency_seconds)  # the handler's own thread
        status, response = self._answer_step(request, messages, step_index, authorization)
        with self._lock:
            self.requests.append(
                ScriptedRequest(
                    step=step_index,
                    status=status,
                    body=dict(request),
                    response=response,
                    authorization=authorization,
                )
            )
        return status, response

    def _answer_step(
        self,
        request: Mapping[str, Any],
        messages: list[Any],
        step_index: int,
        authorization: str | None,
    ) -> tuple[int, dict[str, Any]]:
        request_key = hashlib.sha256(_canonical(messages).encode()).hexdigest()
        step = self.script.steps[step_index] if step_index < len(self.script.steps) else None
        if step is not None and step.delay is not None:
            with self._lock:
                attempt = self._delays.get(request_key, 0)
                self._delays[request_key] = attempt + 1
            if step.delay.times is None or attempt < step.delay.times:
                self._released.wait(step.delay.seconds)  # the handler's own thread
        if step is not None and step.error is not None:
            with self._lock:
                attempt = self._attempts.get(request_key, 0)
                self._attempts[request_key] = attempt + 1
            if step.error.times is None or attempt < step.error.times:
                message = step.error.message or f"scripted failure at step {step_index}"
                if step.error.status == HTTPStatus.UNAUTHORIZED:
                    token = (authorization or "").removeprefix("Bearer ")
                    message = f"Incorrect API key provided: {token}"
                return _error_body(HTTPStatus(step.error.status), message)
        return HTTPStatus.OK, self._completion(request, step, step_index, request_key)

    def _completion(
        self, request: Mapping[str, Any], step: ScriptStep | None, index: int, key: str
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if step is None:
            message["content"] = EXHAUSTED_MESSAGE
        else:
            message["content"] = step.content
            if step.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": f"call_s{index}_{position}",
                        "type": "function",
                        "function": {"name": call.name, "arguments": _canonical(call.arguments)},
                    }
                    for position, call in enumerate(step.tool_calls)
                ]
        if step is not None and step.usage is not None:
            prompt_tokens = step.usage.prompt_tokens
            completion_tokens = step.usage.completion_tokens
        else:
            prompt_tokens = _approximate_tokens(
                _canonical({"messages": request["messages"], "tools": request.get("tools")})
            )
            completion_tokens = _approximate_tokens(_canonical(message))
        return {
            "id": f"chatcmpl-scripted-{key[:16]}-{index}",
            "object": "chat.completion",
            "created": 0,
            # The model asked for, as providers do, so litellm prices it under that name.
            "model": str(request.get("model") or MODEL_NAME),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if "tool_calls" in message else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _error_body(status: HTTPStatus, message: str) -> tuple[int, dict[str, Any]]:
    error_type = {
        HTTPStatus.UNAUTHORIZED: "invalid_request_error",
        HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_exceeded",
    }.get(status, "server_error")
    return status, {"error": {"message": message, "type": error_type, "code": status.value}}


class _Handler(BaseHTTPRequestHandler):
    server: _ScriptedHTTPServer
    protocol_version = "HTTP/1.1"
    # An answer goes out as two writes (headers, then body). With Nagle's algorithm the body
    # waited for the client's delayed ACK of the headers, ~40 ms on Linux, on every call of a
    # kept-alive connection but the first: the model seemed 45 ms slow, which no real provider
    # is for that reason, and the demo task spent most of its time there.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        if self.path.split("?")[0] not in COMPLETION_PATHS:
            self._send(*_error_body(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(*_error_body(HTTPStatus.BAD_REQUEST, "body is not JSON"))
            return
        if not isinstance(request, dict):
            self._send(*_error_body(HTTPStatus.BAD_REQUEST, "body must be a JSON object"))
            return
        self._send(*self.server.player.answer(request, self.headers.get("Authorization")))

    def do_GET(self) -> None:
        if self.path in ("/health", "/v1/models", "/models"):
            self._send(HTTPStatus.OK, {"object": "list", "data": [{"id": MODEL_NAME}]})
        else:
            self._send(*_error_body(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}"))

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header(SCRIPTED_HEADER, "true")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("scripted model: " + format, *args)


class _ScriptedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Connections a burst may open before they are accepted (the default, 5, drops the rest's
    # SYNs, and each retry costs a second: the model would look slow, not Taskbus).
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], player: ScriptPlayer) -> None:
        super().__init__(address, _Handler)
        self.player = player


class ScriptedLLM:
    """The scripted model served from a background thread; `url` is the OpenAI base URL."""

    def __init__(
        self,
        script: Path | str | Mapping[str, Any] | Script | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.player = ScriptPlayer(load_script(script))
        self._server = _ScriptedHTTPServer((host, port), self.player)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]!s}:{self.port}/v1"

    def start(self) -> ScriptedLLM:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="scripted-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.player.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ScriptedLLM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Taskbus scripted (offline) model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--script", type=Path, default=None, help="script JSON (default: demo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before the server thread starts
    with ScriptedLLM(args.script, args.host, args.port) as server:
        print(server.url, flush=True)
        logger.info("scripted model (not a real LLM) serving %s", server.url)
        signal.sigwait(stop_signals)


if __name__ == "__main__":
    main()
