"""`python -m taskbus.event_store`: run the event-store until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging

from taskbus.contracts.config import settings_from_env
from taskbus.event_store.app import run
from taskbus.event_store.settings import EventStoreSettings


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(settings_from_env(EventStoreSettings)))


if __name__ == "__main__":
    main()
