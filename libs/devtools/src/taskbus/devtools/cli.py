"""The `taskbus` command: run the local stack (`up`, `demo`) and use its public API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from taskbus.contracts.asyncapi import asyncapi_document
from taskbus.contracts.bus import CREDENTIALS_FILE_ENV
from taskbus.devtools import bus_auth
from taskbus.devtools.client import (
    ApiError,
    TaskbusClient,
    is_final_status_event,
    render_event,
)
from taskbus.devtools.launcher import (
    StackInfo,
    load_settings,
    local_api_key,
    run_stack,
    write_nats_config,
)
from taskbus.devtools.sandbox_policy import UnsandboxedRefused

DEMO_TASK = (
    "Plan the work with the task tracker, create hello.txt with a greeting, "
    "add a README.md describing the project, and finish."
)


def _api_key(data_dir: str) -> str:
    key = os.environ.get("TASKBUS_API_KEY") or local_api_key(Path(data_dir) / "api_keys")
    if key:
        return key
    raise SystemExit("no API key: set TASKBUS_API_KEY or run `taskbus up` first")


def _client() -> TaskbusClient:
    settings = load_settings()
    url = os.environ.get("TASKBUS_URL", f"http://127.0.0.1:{settings.port}")
    return TaskbusClient(url, _api_key(settings.data_dir))


async def follow_until_done(client: TaskbusClient, conversation_id: str) -> str:
    """Print events live until the conversation reaches a final status; return that status."""
    async for event in client.follow(conversation_id):
        print(render_event(event), flush=True)
        if is_final_status_event(event):
            return str(event["status"])
    return "DISCONNECTED"


async def _submit_and_follow(client: TaskbusClient, spec: dict[str, Any]) -> int:
    created = await client.create_conversation(**spec)
    conversation_id = created["conversation_id"]
    print(f"conversation {conversation_id}", flush=True)
    status = await follow_until_done(client, conversation_id)
    conversation = await client.get_conversation(conversation_id)
    cost = conversation.get("accumulated_cost", 0.0)
    print(f"conversation {conversation_id} ended {status} (cost ${cost:.6f})", flush=True)
    return 0 if status == "FINISHED" else 1


async def _demo(info: StackInfo) -> None:
    print(f"Taskbus is up at {info.gateway_url} (API key {info.api_key}); submitting a demo task.")
    client = TaskbusClient(info.gateway_url, info.api_key)
    try:
        code = await _submit_and_follow(client, {"initial_user_msg": DEMO_TASK, "title": "Demo"})
    finally:
        await client.close()
    if code != 0:
        raise SystemExit(code)


async def _with_client(action: Callable[[TaskbusClient], Awaitable[int]]) -> int:
    client = _client()
    try:
        return await action(client)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taskbus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start NATS, the scripted model and the four services")
    commands.add_parser("demo", help="start the stack, run a sample task, print its events")
    run = commands.add_parser("run", help="submit a task and follow it live")
    run.add_argument("task")
    run.add_argument("--repo", dest="repository")
    run.add_argument("--branch", dest="selected_branch")
    commands.add_parser("ls", help="list conversations")
    events = commands.add_parser("events", help="search a conversation's events")
    events.add_argument("conversation_id")
    events.add_argument("--start-id", type=int)
    events.add_argument("--end-id", type=int)
    events.add_argument("--limit", type=int)
    events.add_argument("--kind")
    events.add_argument("--query")
    events.add_argument("--reverse", action="store_true")
    watch = commands.add_parser("watch", help="follow a conversation's events live")
    watch.add_argument("conversation_id")
    for action in ("stop", "pause", "resume"):
        commands.add_parser(action, help=f"{action} a conversation").add_argument("conversation_id")
    event_store = commands.add_parser("event-store", help="event-store maintenance")
    event_store.add_argument(
        "action", choices=["rebuild"], help="rebuild: replay the log into fresh tables"
    )
    commands.add_parser("asyncapi", help="print the internal protocol as AsyncAPI 3.0 JSON")
    nats_auth = commands.add_parser(
        "nats-auth",
        help="write one NATS credential per service and the server's users (deploy/nats)",
    )
    nats_auth.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    if args.command in ("up", "demo"):
        if args.command == "demo":
            # The demo's stack lives only as long as the command: its sandboxes go with it.
            os.environ.setdefault("TASKBUS_REMOVE_SANDBOXES_ON_SHUTDOWN", "true")
        try:
            asyncio.run(
                run_stack(load_settings(), after_start=_demo if args.command == "demo" else None)
            )
        except UnsandboxedRefused as refused:
            print(refused, file=sys.stderr)
            return 2
        return 0
    if args.command == "nats-auth":
        credentials = bus_auth.new_credentials(args.directory)
        write_nats_config(args.directory / "auth.conf", credentials)
        print(f"wrote {args.directory}/auth.conf and one <user>.json per service (0600)")
        return 0
    if args.command == "run":
        spec = {
            key: value
            for key, value in (
                ("initial_user_msg", args.task),
                ("repository", args.repository),
                ("selected_branch", args.selected_branch),
            )
            if value is not None
        }
        return asyncio.run(_with_client(lambda c: _submit_and_follow(c, spec)))
    if args.command == "asyncapi":
        print(json.dumps(asyncapi_document(), indent=2))
        return 0
    if args.command == "event-store":
        # Runs the event-store's own command in its own process: the CLI imports no service.
        # It logs in as the event-store (`taskbus up`'s credential, unless one is set).
        credential = bus_auth.credential_file(Path(load_settings().data_dir) / "bus", "event_store")
        env = dict(os.environ)
        if credential.exists():
            env.setdefault(CREDENTIALS_FILE_ENV, str(credential))
        return subprocess.call([sys.executable, "-m", "taskbus.event_store", args.action], env=env)
    if args.command == "ls":

        async def list_all(client: TaskbusClient) -> int:
            page = await client.list_conversations()
            for item in page.get("results", []):
                print(f"{item['conversation_id']}  {item['taskbus_status']:<9} {item['title']}")
            return 0

        return asyncio.run(_with_client(list_all))
    if args.command == "events":
        params = {
            key: value
            for key, value in (
                ("start_id", args.start_id),
                ("end_id", args.end_id),
                ("limit", args.limit),
                ("kind", args.kind),
                ("query", args.query),
                ("reverse", "true" if args.reverse else None),
            )
            if value is not None
        }

        async def search(client: TaskbusClient) -> int:
            page = await client.search_events(args.conversation_id, **params)
            for event in page["events"]:
                print(render_event(event))
            if page.get("has_more"):
                print(f"... more from start_id={page.get('next_start_id')}")
            return 0

        return asyncio.run(_with_client(search))
    if args.command == "watch":
        return asyncio.run(_with_client(_watch(args.conversation_id)))
    return asyncio.run(_with_client(lambda c: _control(c, args.conversation_id, args.command)))


def _watch(conversation_id: str) -> Callable[[TaskbusClient], Awaitable[int]]:
    async def watch(client: TaskbusClient) -> int:
        status = await follow_until_done(client, conversation_id)
        return 0 if status == "FINISHED" else 1

    return watch


async def _control(client: TaskbusClient, conversation_id: str, action: str) -> int:
    """Say what happened: accepted (with the status now), or refused and why (exit 1)."""
    try:
        answer = await client.control(conversation_id, action)
    except ApiError as error:
        problem = error.problem
        status = problem.get("taskbus_status")
        now = f" (the conversation is {status})" if status else ""
        print(f"{action} refused: {problem.get('detail') or error}{now}", file=sys.stderr)
        return 1
    print(f"{action}: accepted, the conversation is {answer.get('taskbus_status')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
