"""The `taskbus` command: run the local stack (`up`, `down`, `status`, `demo`) and use its API.

Every failure is one line on stderr saying what to do next, with a non-zero exit; no traceback
reaches the user. The gateway's URL and key come from `TASKBUS_URL` / `TASKBUS_API_KEY` or the
config file `taskbus up` writes (client.config_file), never from the current directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from websockets.exceptions import ConnectionClosed, InvalidURI

from taskbus.contracts.asyncapi import asyncapi_document
from taskbus.contracts.bus import CREDENTIALS_FILE_ENV
from taskbus.contracts.events import EVENT_TYPES
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools import bus_auth
from taskbus.devtools.cli_render import LiveView, conversation_table
from taskbus.devtools.client import (
    ApiError,
    ClientConfig,
    CliError,
    TaskbusClient,
    config_file,
    is_final_status_event,
    load_config,
    render_event,
)
from taskbus.devtools.launcher import (
    LauncherSettings,
    StackInfo,
    StartupFailed,
    load_settings,
    run_stack,
    write_nats_config,
)
from taskbus.devtools.local_stack import (
    StackRunning,
    pid_alive,
    read_state,
    running_pid,
    stop_running,
)
from taskbus.devtools.sandbox_policy import UnsandboxedRefused

DEMO_TASK = (
    "Plan the work with the task tracker, create hello.txt with a greeting, "
    "add a README.md describing the project, and finish."
)
# What a shell reports for a command ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130
FOLLOW_RECONNECTS = 5

app = typer.Typer(
    name="taskbus",
    help="Run AI coding agents' tasks on Taskbus: start the local stack, submit and follow tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide when not a terminal: a table piped to a file keeps its ids whole.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConversationId = Annotated[str, typer.Argument(help="the conversation's id (see `taskbus ls`)")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {' '.join(message.split())}", markup=False)
    raise typer.Exit(code)


def explain(error: ApiError, config: ClientConfig, conversation_id: str | None) -> str:
    """A refused request as one line that says what to do next."""
    problem = error.problem
    said = ": ".join(str(part) for part in (problem.get("title"), problem.get("detail")) if part)
    if error.status == 401:
        return (
            f"the gateway at {config.url} refused the API key ({said}): set TASKBUS_API_KEY, "
            f"or run `taskbus up`, which saves the local key in {config_file()}"
        )
    if error.status == 404 and conversation_id is not None:
        return (
            f"no conversation {conversation_id} here (mistyped, deleted or another user's): "
            "`taskbus ls` lists yours"
        )
    if error.status == 409 and problem.get("taskbus_status"):
        return f"{said} (the conversation is {problem['taskbus_status']})"
    if error.status == 429:
        return f"{said}: retry in a moment"
    if error.status >= 500:
        return f"the gateway answered {error.status} ({said}): check `taskbus status` and retry"
    return f"{said or error.status} (HTTP {error.status})"


@contextlib.contextmanager
def api_errors(config: ClientConfig, conversation_id: str | None = None) -> Iterator[None]:
    """Every way a request fails, as the one line `fail` prints."""
    try:
        yield
    except ApiError as error:
        fail(explain(error, config, conversation_id))
    except (httpx.ConnectError, ConnectionRefusedError, InvalidURI) as error:
        fail(
            f"cannot reach the gateway at {config.url} ({error or type(error).__name__}): start "
            "it with `taskbus up`, or point TASKBUS_URL at a running one"
        )
    except (httpx.TimeoutException, TimeoutError):
        fail(f"the gateway at {config.url} did not answer in time: check `taskbus status`")
    except (httpx.HTTPError, ConnectionClosed, OSError) as error:
        fail(f"lost the gateway at {config.url} ({error}): check `taskbus status`, then retry")


def call(
    action: Callable[[TaskbusClient], Awaitable[int]], conversation_id: str | None = None
) -> None:
    """Run `action` with a client of the configured gateway; its result is the exit code."""
    try:
        config = load_config()
    except CliError as error:
        fail(str(error))
    if not config.api_key:
        fail(
            f"no API key: run `taskbus up` (it saves the local one in {config_file()}), "
            "or set TASKBUS_API_KEY"
        )

    async def with_client() -> int:
        client = TaskbusClient(config.url, config.api_key or "")
        try:
            return await action(client)
        finally:
            await client.close()

    with api_errors(config, conversation_id):
        code = asyncio.run(with_client())
    raise typer.Exit(code)


# --- following a conversation ------------------------------------------------------------------


async def follow_until_done(client: TaskbusClient, conversation_id: str) -> str:
    """Print events as they come, with the plan and a spinner below them, until the
    conversation settles; its final status. Reconnects from the last event seen."""
    view = LiveView()
    last_id = -1
    with Live(view, console=out, transient=True, refresh_per_second=8):
        for attempt in range(FOLLOW_RECONNECTS + 1):
            try:
                async for event in client.follow(conversation_id, after_id=last_id):
                    last_id = max(last_id, int(event.get("id", last_id)))
                    out.print(render_event(event), markup=False, soft_wrap=True)
                    view.update(event)
                    if is_final_status_event(event):
                        return str(event["status"])
                return "DISCONNECTED"  # the gateway closed the stream (conversation deleted)
            except (ConnectionClosed, OSError):
                if attempt == FOLLOW_RECONNECTS:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
    return "DISCONNECTED"


async def _submit_and_follow(
    client: TaskbusClient, spec: dict[str, Any], created: list[str]
) -> int:
    answer = await client.create_conversation(**spec)
    conversation_id = answer["conversation_id"]
    created.append(conversation_id)
    out.print(f"conversation {conversation_id}")
    status = await follow_until_done(client, conversation_id)
    conversation = await client.get_conversation(conversation_id)
    cost = conversation.get("accumulated_cost", 0.0)
    out.print(f"conversation {conversation_id} ended {status} (cost ${cost:.6f})")
    return 0 if status == "FINISHED" else 1


@app.command()
def run(
    task: Annotated[str, typer.Argument(help="what the agent should do")],
    repo: Annotated[str | None, typer.Option("--repo", help="git repository to clone")] = None,
    branch: Annotated[str | None, typer.Option(help="branch of --repo")] = None,
    title: Annotated[str | None, typer.Option(help="the conversation's title")] = None,
) -> None:
    """Submit a task and follow it live (plan, commands, a spinner while the agent thinks)."""
    spec = {
        key: value
        for key, value in (
            ("initial_user_msg", task),
            ("repository", repo),
            ("selected_branch", branch),
            ("title", title),
        )
        if value is not None
    }
    created: list[str] = []
    try:
        call(lambda client: _submit_and_follow(client, spec, created))
    except KeyboardInterrupt:
        if not created:
            fail("interrupted before the task was submitted", INTERRUPTED)
        cid = created[0]
        fail(
            f"stopped following; conversation {cid} keeps running: `taskbus watch {cid}` "
            f"follows it again, `taskbus stop {cid}` stops it",
            INTERRUPTED,
        )


@app.command()
def watch(conversation_id: ConversationId) -> None:
    """Follow a conversation's events live until it settles (exit 0 when FINISHED)."""

    async def watching(client: TaskbusClient) -> int:
        await client.get_conversation(conversation_id)  # an unknown id is a 404 here
        return 0 if await follow_until_done(client, conversation_id) == "FINISHED" else 1

    try:
        call(watching, conversation_id)
    except KeyboardInterrupt:
        fail(
            f"stopped watching; conversation {conversation_id} goes on "
            f"(`taskbus stop {conversation_id}` stops it)",
            INTERRUPTED,
        )


# --- listing and reading -----------------------------------------------------------------------


@app.command("ls")
def list_conversations(
    limit: Annotated[int, typer.Option(min=1, max=100, help="rows per page")] = 20,
    page_id: Annotated[str | None, typer.Option(help="the page `ls` named as next")] = None,
    status: Annotated[
        ConversationStatus | None, typer.Option(case_sensitive=False, help="only this status")
    ] = None,
    repo: Annotated[str | None, typer.Option(help="only conversations of this repository")] = None,
    title: Annotated[str | None, typer.Option(help="only titles containing this text")] = None,
) -> None:
    """Your conversations, newest first, a page at a time."""
    params = {
        key: value
        for key, value in (
            ("limit", limit),
            ("page_id", page_id),
            ("status", status.value if status else None),
            ("repository", repo),
            ("title", title),
        )
        if value is not None
    }

    async def listing(client: TaskbusClient) -> int:
        page = await client.list_conversations(**params)
        results = page.get("results", [])
        if not results:
            out.print("no conversations" + (" match" if len(params) > 1 else " yet"))
        else:
            out.print(conversation_table(results))
        next_page = page.get("next_page_id")
        if next_page:
            out.print(f"more: taskbus ls --page-id {next_page}", markup=False)
        return 0

    call(listing)


@app.command()
def show(conversation_id: ConversationId) -> None:
    """One conversation's state (as JSON)."""

    async def showing(client: TaskbusClient) -> int:
        out.print_json(json.dumps(await client.get_conversation(conversation_id)))
        return 0

    call(showing, conversation_id)


def event_kinds(kinds: list[str]) -> list[str]:
    """The kinds as given, or a CliError naming the valid ones (the API would answer nothing)."""
    for kind in kinds:
        if kind not in EVENT_TYPES:
            close = difflib.get_close_matches(kind, EVENT_TYPES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise CliError(
                f"unknown event kind {kind!r}: {hint}valid kinds: {', '.join(sorted(EVENT_TYPES))}"
            )
    return kinds


@app.command()
def events(
    conversation_id: ConversationId,
    start_id: Annotated[int | None, typer.Option(min=0)] = None,
    end_id: Annotated[int | None, typer.Option(min=0, help="inclusive")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=100)] = None,
    kind: Annotated[list[str] | None, typer.Option(help="event kind (repeatable)")] = None,
    query: Annotated[str | None, typer.Option(help="text the event contains")] = None,
    reverse: Annotated[bool, typer.Option(help="newest first")] = False,
) -> None:
    """Search a conversation's events."""
    try:
        kinds = event_kinds([k for value in kind or [] for k in value.split(",") if k])
    except CliError as error:
        fail(str(error))
    params = {
        key: value
        for key, value in (
            ("start_id", start_id),
            ("end_id", end_id),
            ("limit", limit),
            ("kind", ",".join(kinds) or None),
            ("query", query),
            ("reverse", "true" if reverse else None),
        )
        if value is not None
    }

    async def search(client: TaskbusClient) -> int:
        page = await client.search_events(conversation_id, **params)
        for event in page["events"]:
            out.print(render_event(event), markup=False, soft_wrap=True)
        if not page["events"]:
            out.print("no events match")
        if page.get("has_more"):
            out.print(f"more: add --start-id {page.get('next_start_id')}")
        return 0

    call(search, conversation_id)


@app.command()
def files(
    conversation_id: ConversationId,
    path: Annotated[str, typer.Argument(help="a directory (lists it) or a file (prints it)")] = "",
) -> None:
    """List the workspace (or a directory of it), or print one of its files."""

    async def listing(client: TaskbusClient) -> int:
        if path and not path.endswith("/"):
            with contextlib.suppress(ApiError):
                out.print(await client.read_file(conversation_id, path), markup=False, end="")
                return 0
        for entry in await client.list_files(conversation_id, path):
            out.print(entry, markup=False)
        return 0

    call(listing, conversation_id)


@app.command()
def diff(
    conversation_id: ConversationId,
    path: Annotated[str | None, typer.Argument(help="one file: its diff")] = None,
) -> None:
    """Files changed since the clone, or one file's unified diff."""

    async def diffing(client: TaskbusClient) -> int:
        if path is None:
            changes = await client.git_changes(conversation_id)
            for change in changes:
                out.print(f"{change['status']}  {change['path']}", markup=False)
            if not changes:
                out.print("no changes")
            return 0
        both = await client.git_diff(conversation_id, path)
        lines = difflib.unified_diff(
            both["original"].splitlines(keepends=True),
            both["modified"].splitlines(keepends=True),
            f"a/{path}",
            f"b/{path}",
        )
        out.print("".join(lines), markup=False, end="")
        return 0

    call(diffing, conversation_id)


# --- commands to a conversation ----------------------------------------------------------------


def _command(
    conversation_id: str, verb: str, send: Callable[[TaskbusClient], Awaitable[dict[str, Any]]]
) -> None:
    async def sending(client: TaskbusClient) -> int:
        answer = await send(client)
        now = answer.get("taskbus_status")
        out.print(f"{verb}: accepted" + (f", the conversation is {now}" if now else ""))
        return 0

    call(sending, conversation_id)


def _control_command(action: str, summary: str) -> None:
    def command(conversation_id: ConversationId) -> None:
        _command(conversation_id, action, lambda client: client.control(conversation_id, action))

    command.__doc__ = summary
    app.command(action)(command)


for _action, _summary in (
    ("stop", "Stop a conversation (its sandbox is given back)."),
    ("pause", "Pause a conversation (its sandbox is frozen)."),
    ("resume", "Resume a paused conversation."),
    ("confirm", "Confirm the action awaiting your approval."),
    ("reject", "Reject the action awaiting your approval."),
):
    _control_command(_action, _summary)


@app.command()
def send(
    conversation_id: ConversationId,
    message: Annotated[str, typer.Argument(help="what to tell the agent")],
) -> None:
    """Send the agent a message (also answers an agent waiting for input)."""
    _command(conversation_id, "send", lambda client: client.send_message(conversation_id, message))


@app.command()
def delete(
    conversation_id: ConversationId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete a conversation: its events, rows and workspace are purged."""
    if not yes:
        typer.confirm(f"Delete conversation {conversation_id} and all it holds?", abort=True)
    _command(conversation_id, "delete", lambda client: client.delete_conversation(conversation_id))


@app.command()
def settings(
    assignments: Annotated[
        list[str] | None,
        typer.Argument(help='NAME=VALUE to change (JSON values: 5, true, null, "text")'),
    ] = None,
) -> None:
    """Show your settings, or change some: `taskbus settings max_iterations=50`."""
    changes: dict[str, Any] = {}
    for assignment in assignments or []:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            fail(f"{assignment!r} is not NAME=VALUE: e.g. `taskbus settings max_iterations=50`")
        try:
            changes[name] = json.loads(value)
        except ValueError:
            changes[name] = value  # plain text needs no quotes

    async def showing(client: TaskbusClient) -> int:
        current = await client.settings()
        if changes:
            # PUT replaces every setting: send what is stored with the changes over it.
            current = await client.store_settings({**_storable(current), **changes})
        table = Table(box=None, show_header=False)
        for name, value in sorted(current.items()):
            table.add_row(name, json.dumps(value))
        out.print(table)
        return 0

    call(showing)


def _storable(shown: dict[str, Any]) -> dict[str, Any]:
    """The shown settings as a PUT body: only the settings a user has (the rest of the view is
    OpenHands' fixed keys), without `llm_api_key`, whose absence keeps the stored key."""
    names = {field.name for field in msgspec.structs.fields(UserSettings)} - {"llm_api_key"}
    return {name: value for name, value in shown.items() if name in names}


# --- the local stack -----------------------------------------------------------------------


def _launch(settings: LauncherSettings, demo: bool, keep_sandboxes: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        asyncio.run(
            run_stack(
                settings,
                after_start=_demo if demo else None,
                keep_sandboxes=keep_sandboxes,
                progress=lambda line: out.print(line, markup=False),
            )
        )
    except (StackRunning, UnsandboxedRefused) as refused:
        fail(str(refused), 2)
    except StartupFailed as failed:
        first, _, tail = str(failed).partition("\n")
        err.print(f"error: {first}", markup=False)
        err.print(tail, markup=False)
        raise typer.Exit(1) from None
    out.print("Taskbus stopped.")


async def _demo(info: StackInfo) -> None:
    out.print(f"Taskbus is up at {info.gateway_url} (API key {info.api_key}); submitting a demo.")
    client = TaskbusClient(info.gateway_url, info.api_key)
    try:
        code = await _submit_and_follow(
            client, {"initial_user_msg": DEMO_TASK, "title": "Demo"}, []
        )
    finally:
        await client.close()
    if code != 0:
        raise StartupFailed(f"the demo task did not finish (exit {code})")


@app.command()
def up(
    keep_sandboxes: Annotated[
        bool, typer.Option(help="leave docker sandboxes running on stop, to re-attach next time")
    ] = False,
) -> None:
    """Start NATS, the scripted model (if no LLM is configured) and the four services."""
    _launch(load_settings(), demo=False, keep_sandboxes=keep_sandboxes)


@app.command()
def demo() -> None:
    """Start the stack, run a sample task, print its events, stop."""
    _launch(load_settings(), demo=True, keep_sandboxes=False)


def _data_dir() -> Path:
    """`TASKBUS_DATA_DIR`, else the one the last `taskbus up` recorded, else the default."""
    recorded = None
    with contextlib.suppress(CliError):
        recorded = load_config().data_dir
    chosen = os.environ.get("TASKBUS_DATA_DIR") or recorded or LauncherSettings().data_dir
    return Path(chosen).resolve()


@app.command()
def down(
    timeout: Annotated[float, typer.Option(help="seconds to wait for it to stop")] = 90,
) -> None:
    """Stop the `taskbus up` running on the data dir (its children and sandboxes too)."""
    data_dir = _data_dir()
    try:
        pid = stop_running(data_dir, timeout)
    except TimeoutError as error:
        fail(f"{error}: see {data_dir / 'logs'}, or kill it")
    if pid is None:
        out.print(f"taskbus is not running on {data_dir}")
    else:
        out.print(f"stopped taskbus up (pid {pid}) on {data_dir}")


@app.command()
def status() -> None:
    """Show each process of the local stack and whether its gateway is ready."""
    data_dir = _data_dir()
    pid = running_pid(data_dir)
    state = read_state(data_dir)
    if pid is None or state is None:
        fail(f"taskbus is not running on {data_dir}: start it with `taskbus up`")
    table = Table(box=None, header_style="bold")
    for column in ("PROCESS", "PID", "STATE"):
        table.add_column(column)
    table.add_row("taskbus up", str(pid), "running" if pid_alive(pid) else "gone")
    healthy = True
    for pid_file in sorted((data_dir / "pids").glob("*.pid")):
        child = int(pid_file.read_text().strip() or 0)
        alive = child > 0 and pid_alive(child)
        healthy &= alive
        table.add_row(pid_file.stem, str(child), "running" if alive else "exited")
    ready = state.ready and _gateway_is_ours(state.gateway_url, state.nonce)
    out.print(table)
    out.print(
        f"gateway {state.gateway_url}: "
        + ("ready" if ready else "not ready (starting, or another server holds its port)")
    )
    out.print(f"NATS {state.nats_url}; logs in {data_dir / 'logs'}")
    raise typer.Exit(0 if ready and healthy else 1)


def _gateway_is_ours(url: str, nonce: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(f"{url}/api/health", timeout=3)
        return bool(response.status_code == 200 and response.json().get("instance") == nonce)
    return False


# --- operators' tools ----------------------------------------------------------------------


@app.command(name="event-store")
def event_store(
    action: Annotated[str, typer.Argument(help="rebuild: replay the log into fresh tables")],
) -> None:
    """Event-store maintenance (runs the event-store's own command)."""
    if action != "rebuild":
        fail(f"unknown event-store action {action!r}: the one action is `rebuild`")
    # Runs in its own process: the CLI imports no service. It logs in as the event-store
    # (`taskbus up`'s credential, unless one is set).
    credential = bus_auth.credential_file(Path(load_settings().data_dir) / "bus", "event_store")
    env = dict(os.environ)
    if credential.exists():
        env.setdefault(CREDENTIALS_FILE_ENV, str(credential))
    code = subprocess.call([sys.executable, "-m", "taskbus.event_store", action], env=env)
    raise typer.Exit(code)


@app.command()
def asyncapi() -> None:
    """Print the internal protocol as AsyncAPI 3.0 JSON."""
    print(json.dumps(asyncapi_document(), indent=2))


@app.command(name="nats-auth")
def nats_auth(
    directory: Annotated[Path, typer.Argument(help="where to write them")],
) -> None:
    """Write one NATS credential per service and the server's users (deploy/nats)."""
    credentials = bus_auth.new_credentials(directory)
    write_nats_config(directory / "auth.conf", credentials)
    out.print(f"wrote {directory}/auth.conf and one <user>.json per service (0600)")


def main() -> None:
    """The `taskbus` script: usage errors too are one line with a hint, not a box of help."""
    if len(sys.argv) <= 1:
        app(prog_name="taskbus")  # the help
    try:
        code = app(prog_name="taskbus", standalone_mode=False)
    except typer.TyperException as error:  # click's usage errors (unknown option, bad value)
        context = getattr(error, "ctx", None)
        path = context.command_path if context is not None else "taskbus"
        said = " ".join(str(error).split()).rstrip(".")
        err.print(f"error: {said}; see `{path} --help`", markup=False)
        sys.exit(error.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
