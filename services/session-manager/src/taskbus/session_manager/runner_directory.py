"""Where sandboxes go: the runners that registered in KV `taskbus_runners`, which of them still
send heartbeats, and which has room.

A runner puts its entry again every `HEARTBEAT_SECONDS`; an entry whose revision has not changed
for `lost_after` seconds, timed by this process's clock (hosts' clocks may disagree), is a lost
runner. Only silence this process watched counts: after a gap in its own reading (it was hung,
say SIGSTOPped, or starved), every runner gets a fresh `lost_after` to be heard from, or a
session-manager continued after a pause would fail every conversation of runners that beat all
along. Placement takes the live runner with the most free slots as this instance sees them: its
last heartbeat's count plus what this instance placed there since. Instances placing at once may
fill a runner past its slots; admission (the global running limit) bounds by how much.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.runners import HEARTBEAT_SECONDS, RunnerInfo, decode_runner_info
from taskbus.contracts.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class NoRunner(Exception):
    """No runner sent a heartbeat within the placement wait."""


class _Seen(msgspec.Struct, frozen=True):
    info: RunnerInfo
    revision: int
    changed_at: float  # the directory's clock when this revision was first seen


class RunnerDirectory:
    def __init__(
        self,
        js: JetStreamContext,
        lost_after: float,
        placement_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self._lost_after = lost_after
        self._placement_wait = placement_wait
        self._clock = clock
        # Longer between two readings than the reading loop ever takes: this process was not
        # watching, so no silence was seen.
        self._unwatched_after = max(lost_after / 2, 3 * HEARTBEAT_SECONDS)
        self._seen: dict[str, _Seen] = {}
        self._placed: Counter[str] = Counter()  # by this instance since the runner's last beat
        self._since = clock()
        self._read_at: float | None = None  # when the bucket was last read
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._since = self._clock()
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="runner-directory")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS / 2)
            try:
                await self.refresh()
            except (nats.errors.Error, TimeoutError) as error:
                logger.warning("reading the runners bucket failed: %r", error)

    async def refresh(self) -> None:
        """Read every entry; a changed revision is a heartbeat."""
        bucket = await self._js.key_value(subjects.RUNNERS_BUCKET)
        try:
            keys = await bucket.keys()
        except nats.js.errors.NoKeysError:
            return
        now = self._clock()
        if self._read_at is not None and now - self._read_at > self._unwatched_after:
            logger.warning(
                "runners not read for %.0f s (this process was held up): each gets a fresh %.0f s"
                " to be heard from",
                now - self._read_at,
                self._lost_after,
            )
            self._since = now
            self._seen = {
                rid: msgspec.structs.replace(seen, changed_at=now)
                for rid, seen in self._seen.items()
            }
        self._read_at = now
        for key in keys:
            try:
                entry = await bucket.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            seen = self._seen.get(key)
            if entry.revision is None or (seen is not None and seen.revision == entry.revision):
                continue
            try:
                info = decode_runner_info(entry.value or b"")
            except msgspec.MsgspecError as error:  # only runners may write here; still, skip
                logger.warning("runner entry %r is not a RunnerInfo: %s", key[:80], error)
                continue
            self._seen[key] = _Seen(info, entry.revision, now)
            self._placed.pop(key, None)  # its own count is fresh again

    def silent_seconds(self, runner_id: str) -> float:
        """Since the runner's entry last changed (or since this instance started looking)."""
        seen = self._seen.get(runner_id)
        return self._clock() - (seen.changed_at if seen is not None else self._since)

    def is_lost(self, runner_id: str) -> bool:
        return self.silent_seconds(runner_id) > self._lost_after

    def live(self) -> list[RunnerInfo]:
        return [seen.info for rid, seen in self._seen.items() if not self.is_lost(rid)]

    async def place(self) -> str:
        """The runner a new sandbox goes to: the live one with the most free slots (ties drawn
        at random, so instances placing at once spread out); waits for one to register."""
        deadline = time.monotonic() + self._placement_wait
        while True:
            live = self.live()
            if live:
                free = {info.runner_id: self._free(info) for info in live}
                most = max(free.values())
                runner_id = random.choice([rid for rid, slots in free.items() if slots == most])
                if most <= 0:
                    logger.warning("every runner is full; placing on %s anyway", runner_id)
                self._placed[runner_id] += 1
                return runner_id
            if time.monotonic() > deadline:
                raise NoRunner(
                    f"no runtime-runner sent a heartbeat in {self._placement_wait:.0f} s"
                )
            await asyncio.sleep(HEARTBEAT_SECONDS / 4)
            await self.refresh()

    def _free(self, info: RunnerInfo) -> int:
        return info.slots - info.sandboxes - self._placed[info.runner_id]
