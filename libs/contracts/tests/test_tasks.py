"""`cancel_and_wait` ends a task even when a cancellation is swallowed, as Python 3.11's
`asyncio.wait_for` (under nats-py's requests) may do when the reply arrives with the cancel."""

from __future__ import annotations

import asyncio

from taskbus.contracts.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def heartbeat() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as wait_for does when its reply arrives with the cancel

    task = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):  # a single cancel() and await would wait forever
        await cancel_and_wait(task)
    assert task.cancelled()
    assert swallowed == 1


async def test_ended_and_failed_tasks_are_waited_for_without_raising() -> None:
    async def fail() -> None:
        raise RuntimeError("a stopping task's last error")

    failed = asyncio.create_task(fail())
    ended = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait(failed, ended)
    assert failed.done() and ended.done()
