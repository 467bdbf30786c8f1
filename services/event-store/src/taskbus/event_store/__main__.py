"""`python -m taskbus.event_store [run|rebuild]`: run the event-store until SIGTERM/SIGINT, or
rebuild its ClickHouse tables and KV projection from the log and exit."""

from __future__ import annotations

import argparse
import sys

import uvloop

from taskbus.contracts import observability, subjects
from taskbus.contracts.config import settings_from_env
from taskbus.event_store.app import run, run_rebuild
from taskbus.event_store.rebuild import EventStoreRunning
from taskbus.event_store.settings import EventStoreSettings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m taskbus.event_store")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "rebuild"],
        default="run",
        help="run the service (default), or drop every table and replay the whole log into it "
        "(stop the event-store first)",
    )
    command = parser.parse_args().command
    observability.setup(subjects.EVENT_STORE)
    settings = settings_from_env(EventStoreSettings)
    if command == "rebuild":
        try:
            conversations = uvloop.run(run_rebuild(settings))
        except EventStoreRunning as running:
            sys.exit(f"rebuild refused: {running}")
        print(f"rebuilt {conversations} conversations")
    else:
        uvloop.run(run(settings))


if __name__ == "__main__":
    main()
