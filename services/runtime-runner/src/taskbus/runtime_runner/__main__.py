"""`python -m taskbus.runtime_runner`: run until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from taskbus.contracts import observability, subjects
from taskbus.contracts.config import settings_from_env
from taskbus.runtime_runner.app import RuntimeRunnerService
from taskbus.runtime_runner.backend import SandboxUnavailable
from taskbus.runtime_runner.settings import RuntimeRunnerSettings


async def main() -> None:
    settings = settings_from_env(RuntimeRunnerSettings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await RuntimeRunnerService(settings).run(stop)


if __name__ == "__main__":
    observability.setup(subjects.RUNTIME_RUNNER)
    try:
        uvloop.run(main())
    except SandboxUnavailable as refusal:  # one line that says what to do, not a traceback
        logging.getLogger("taskbus.runtime_runner").error("%s", refusal)
        sys.exit(2)
