"""The dependency desk: starts or fails the conversations that wait for others to end, applying
`dependencies`' pure decisions to the conversations in memory."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from taskbus.contracts.status import SETTLED_STATUSES, ConversationStatus
from taskbus.session_manager.admission_desk import AdmissionDesk
from taskbus.session_manager.conversations import Append, Conversations
from taskbus.session_manager.decide import status_event
from taskbus.session_manager.dependencies import (
    DEPENDENCY_FAILED,
    resolution,
    waits_for_dependencies,
)
from taskbus.session_manager.state import ConversationState

logger = logging.getLogger(__name__)

_RETRY_SECONDS = 1.0


def _has_ended(state: ConversationState) -> bool:
    """Whether the conversation may now decide its dependents: ended, deleted, or gone."""
    return not state.created or state.deleted or state.status in SETTLED_STATUSES


class DependencyDesk:
    """Out of `SessionManager`, as `AdmissionDesk` is. It keeps an index from each dependency to
    the conversations waiting for it, updated from every state change (`on_change`), so a
    dependency's end reaches its dependents without a scan; and it resolves a dependent when it
    starts waiting (created, restarted, or folded again after a restart of the service: the
    index is rebuilt from the states) and whenever one of its dependencies has ended. Waiting
    holds no admission slot: a dependent joins admission's queue only once resolved.

    Resolving reads the dependencies' states now, so no end can be missed between the
    dependent's creation and the index learning of it: whichever comes second sees the other.
    """

    def __init__(
        self,
        conversations: Conversations,
        deciding: defaultdict[str, asyncio.Lock],
        admission: AdmissionDesk,
        append: Append,
    ) -> None:
        """`deciding` is the service's per-conversation lock (taken before the admission
        lock, as every caller does); `append` returns once the states include the events."""
        self._conversations = conversations
        self._deciding = deciding
        self._admission = admission
        self._append = append
        self._waiting_for: dict[str, tuple[str, ...]] = {}  # dependent -> its dependencies
        self._dependents: defaultdict[str, set[str]] = defaultdict(set)  # the reverse
        self._requested: set[str] = set()
        self._resolvers: dict[str, asyncio.Task[None]] = {}

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """Resolutions under way (the service cancels them when it stops)."""
        return list(self._resolvers.values())

    def on_change(self, state: ConversationState, *, held: bool = True) -> None:
        """Index the conversation if it waits for dependencies, and resolve what may be ready.
        A conversation of a partition another instance holds (`held` False) is only a
        dependency here: its owner resolves it."""
        cid = state.conversation_id
        if held and waits_for_dependencies(state):
            if cid not in self._waiting_for:
                self._waiting_for[cid] = tuple(state.spec.depends_on)
                for dependency in self._waiting_for[cid]:
                    self._dependents[dependency].add(cid)
                self._request(cid)
        elif cid in self._waiting_for:
            for dependency in self._waiting_for.pop(cid):
                self._dependents[dependency].discard(cid)
                if not self._dependents[dependency]:
                    del self._dependents[dependency]
        if cid in self._dependents and _has_ended(state):
            for dependent in self._dependents[cid]:
                self._request(dependent)

    def recheck(self, fresh: Callable[[str], bool]) -> None:
        """Resolve again the dependents with a dependency whose state may be stale here (not
        `fresh`: another instance holds it, so its end came on no consumer of this one)."""
        for dependent, dependencies in list(self._waiting_for.items()):
            if not all(fresh(dependency) for dependency in dependencies):
                self._request(dependent)

    def _request(self, conversation_id: str) -> None:
        """Resolve the conversation soon, again if a resolution of it is under way."""
        self._requested.add(conversation_id)
        if conversation_id not in self._resolvers:
            self._resolvers[conversation_id] = asyncio.create_task(
                self._resolve_requested(conversation_id), name=f"dependencies-{conversation_id}"
            )

    async def _resolve_requested(self, conversation_id: str) -> None:
        try:
            while conversation_id in self._requested:
                self._requested.discard(conversation_id)
                await self._resolve(conversation_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("dependencies of %s not resolved; retrying", conversation_id)
            asyncio.get_running_loop().call_later(_RETRY_SECONDS, self._request, conversation_id)
        finally:
            # Unregistered before any other task runs: a later request starts a new resolver.
            self._resolvers.pop(conversation_id, None)

    async def _resolve(self, conversation_id: str) -> None:
        """Fail the conversation if a dependency failed; give it to admission once all finished
        (the outcome record first, in one decision, so it is never started twice)."""
        async with self._deciding[conversation_id]:
            state = await self._conversations.load(conversation_id)
            if not waits_for_dependencies(state):
                return
            dependencies = [await self._conversations.load(d) for d in state.spec.depends_on]
            resolved = resolution(state, dependencies)
            if resolved is None:
                return
            # Under the admission lock either way: between the record and the failure, the
            # conversation is QUEUED with its dependencies resolved, which admission (freeing a
            # slot meanwhile) would take as ready to start.
            async with self._admission.lock:
                if resolved.failed:
                    logger.info("%s fails: a dependency did not finish", conversation_id)
                    failed = status_event(state, ConversationStatus.ERROR, DEPENDENCY_FAILED)
                    await self._append([resolved, failed], state.last_event_id)
                    return
                await self._append([resolved], state.last_event_id)
                await self._admission.start_or_queue(self._conversations[conversation_id], [])
