"""Cycles in a "depends on" graph: conversations (`ConversationSpec.depends_on`, checked by the
gateway) and the items of a task plan (`TaskItem.depends_on`, checked by session-manager) share
one check. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def find_cycle(depends_on: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle as the path that closes it (`[a, b, a]`: a depends on b, b on a), or None.

    A node missing from `depends_on` depends on nothing. Iterative, so a long chain cannot
    exhaust the interpreter's stack."""
    done: set[str] = set()
    for root in depends_on:
        if root in done:
            continue
        path: list[str] = [root]
        on_path: set[str] = {root}
        pending = [iter(depends_on.get(root, ()))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child in done:
                continue
            path.append(child)
            on_path.add(child)
            pending.append(iter(depends_on.get(child, ())))
    return None
