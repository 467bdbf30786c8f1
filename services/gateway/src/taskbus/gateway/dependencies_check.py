"""The check of a new conversation's `depends_on` before its command is sent: each id must name
a conversation of the same user that exists and is not deleted, and the graph the new one joins
must have no cycle. Otherwise the answer is a 422 problem naming the id (or the cycle).

Ids are derived from the Idempotency-Key (`conversation_id_for`), so a client can name a
conversation before it exists: the cycle a client can build is the new conversation depending
on itself. The graph is still walked as a whole (the conversations' `depends_on`, from their
summaries), so no other shape of cycle gets through either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from taskbus.contracts import subjects
from taskbus.contracts.dependency_graph import find_cycle
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.status import ConversationStatus
from taskbus.gateway.bus import Bus
from taskbus.gateway.problems import Problem

# Most conversations one check reads: a graph beyond it is not walked further (a cycle needs
# the new conversation, which is at most a few steps from its own dependencies).
MAX_WALKED = 1000


def unknown_dependency(dependency: str) -> Problem:
    # The same answer for unknown, deleted and other users' ids: existence is not disclosed.
    return Problem(
        422,
        f"depends_on names {dependency!r}, which is not a conversation of yours",
        kind="unknown-dependency",
        title="Unknown dependency",
        dependency=dependency,
    )


def dependency_cycle(cycle: list[str]) -> Problem:
    return Problem(
        422,
        "depends_on would make a cycle: " + " -> ".join(cycle),
        kind="dependency-cycle",
        title="Dependency cycle",
        dependency=cycle[1],
        cycle=cycle,
    )


async def check_dependencies(
    bus: Bus, user_id: str, conversation_id: str, depends_on: Sequence[str]
) -> None:
    """Raise the 422 problem if `conversation_id` (new) may not depend on `depends_on`."""
    if not depends_on:
        return
    graph: dict[str, Sequence[str]] = {conversation_id: depends_on}
    named = [d for d in dict.fromkeys(depends_on) if d != conversation_id]
    for dependency, info in zip(named, await _owned(bus, user_id, named), strict=True):
        if info is None:
            raise unknown_dependency(dependency)
    frontier = named
    while frontier and len(graph) < MAX_WALKED:
        infos = await _owned(bus, user_id, frontier[: MAX_WALKED - len(graph)])
        found = [info for info in infos if info is not None]
        for info in found:
            graph[info.conversation_id] = info.depends_on
        frontier = list(
            dict.fromkeys(d for info in found for d in info.depends_on if d not in graph)
        )
    cycle = find_cycle(graph)
    if cycle is not None:
        raise dependency_cycle(cycle)


async def _owned(
    bus: Bus, user_id: str, conversation_ids: Sequence[str]
) -> list[ConversationInfo | None]:
    """Each id's conversation if it is the user's and not deleted, else None."""

    async def owned(conversation_id: str) -> ConversationInfo | None:
        if not subjects.is_valid_conversation_id(conversation_id):
            return None  # never reaches a subject
        info = await bus.find_conversation(conversation_id)
        if info is None or info.user_id != user_id or info.status is ConversationStatus.ARCHIVED:
            return None
        return info

    return list(await asyncio.gather(*(owned(cid) for cid in conversation_ids)))
