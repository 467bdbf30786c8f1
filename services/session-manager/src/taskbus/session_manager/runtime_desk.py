"""The runtime desk: which runner holds each sandbox. Out of `SessionManager`, as the admission
and dependency desks are.

- Placement: a `RuntimeRequested` is given its runner (`RunnerDirectory.place`) as it is
  appended, so the choice is in the log and every later reader (this instance after a restart,
  the partition's next owner, the runner coming back) sees the same one.
- Forwarding: each event a runner acts on goes to the runner its conversation is placed on
  (`runner_work.forward`), from the partition's events consumer, before that event is acked.
- Loss: a held conversation whose runner went silent gets `runtime_lost_events`, decided under
  its deciding lock from its state at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import AnyEvent, Event, RuntimeRequested, decode_event
from taskbus.contracts.runner_work import RUNNER_EVENTS, forward
from taskbus.contracts.streams import last_message
from taskbus.session_manager.conversations import Append, Conversations
from taskbus.session_manager.decide import runner_holding_sandbox, runtime_lost_events
from taskbus.session_manager.runner_directory import RunnerDirectory
from taskbus.session_manager.settings import SessionManagerSettings

logger = logging.getLogger(__name__)


class RuntimeDesk:
    def __init__(
        self,
        js: JetStreamContext,
        settings: SessionManagerSettings,
        conversations: Conversations,
        deciding: defaultdict[str, asyncio.Lock],
    ) -> None:
        self._js = js
        self._conversations = conversations
        self._deciding = deciding
        self._shared_workspaces = settings.shared_workspaces
        self.runners = RunnerDirectory(
            js, settings.runner_lost_seconds, settings.placement_wait_seconds
        )

    async def start(self) -> None:
        await self.runners.start()

    async def stop(self) -> None:
        await self.runners.stop()

    async def placed(self, events: Sequence[Event]) -> list[Event]:
        """`events` with each new sandbox request placed on a runner."""
        return [
            msgspec.structs.replace(event, runner_id=await self.runners.place())
            if isinstance(event, RuntimeRequested) and event.runner_id is None
            else event
            for event in events
        ]

    async def forward(self, event: AnyEvent, message: Msg) -> None:
        """Send `event`, consumed as `message`, to its conversation's runner, if a runner acts
        on it. A conversation never placed (its log predates placement) has nobody to tell."""
        if not isinstance(event, RUNNER_EVENTS):
            return
        runner_id = await self._runner_of(event)
        if runner_id is None:  # e.g. deleted while queued: no sandbox was ever placed
            logger.info(
                "%s %s of %s: no runner placed", event.kind, event.id, event.conversation_id
            )
            return
        await forward(self._js, runner_id, event, message)

    async def _runner_of(self, event: Event) -> str | None:
        if isinstance(event, RuntimeRequested):
            return event.runner_id
        cid = event.conversation_id
        state = self._conversations.states.get(cid)
        if state is not None and state.runner_id is not None:
            return state.runner_id
        # Not in memory (settled and forgotten): its latest placement, from the log.
        last = await last_message(self._js, subjects.event_subject(cid, RuntimeRequested.__name__))
        requested = decode_event(last.data) if last is not None and last.data else None
        return requested.runner_id if isinstance(requested, RuntimeRequested) else None

    def _on_lost_runner(self, conversation_id: str) -> bool:
        state = self._conversations.states.get(conversation_id)
        runner_id = runner_holding_sandbox(state) if state is not None else None
        return runner_id is not None and self.runners.is_lost(runner_id)

    async def declare_lost(self, conversation_ids: Iterable[str], append: Append) -> None:
        """For each conversation whose sandbox is on a lost runner: its `RuntimeLost` and what
        follows from it (a restart elsewhere, or the conversation's failure)."""
        suspects = [cid for cid in conversation_ids if self._on_lost_runner(cid)]
        if not suspects:
            return
        try:  # a heartbeat this instance was too busy to read is no silence
            await self.runners.refresh()
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning("runners not read; no runtime declared lost: %r", error)
            return
        for cid in suspects:
            if not self._on_lost_runner(cid):
                continue
            try:
                async with self._deciding[cid]:
                    if not self._on_lost_runner(cid):
                        continue  # changed while we waited for the lock
                    state = self._conversations[cid]
                    runner_id = runner_holding_sandbox(state)
                    assert runner_id is not None
                    silent = self.runners.silent_seconds(runner_id)
                    logger.warning("%s: runner %s is lost (silent %.0f s)", cid, runner_id, silent)
                    events = runtime_lost_events(state, silent, self._shared_workspaces)
                    await append(events, state.last_event_id)
            except Exception:
                logger.exception("runtime loss of %s not recorded; retrying", cid)
