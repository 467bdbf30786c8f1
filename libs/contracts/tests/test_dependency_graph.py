"""The one cycle check of "depends on" graphs (conversations and task plans)."""

from __future__ import annotations

import itertools

import pytest

from taskbus.contracts.dependency_graph import find_cycle


def closes(cycle: list[str] | None, graph: dict[str, list[str]]) -> bool:
    """`cycle` is a real path of `graph` that comes back to where it began."""
    assert cycle is not None
    return cycle[0] == cycle[-1] and all(b in graph[a] for a, b in itertools.pairwise(cycle))


@pytest.mark.parametrize(
    "graph",
    [
        {},
        {"a": []},
        {"a": ["b"], "b": ["c"]},  # c is a leaf nobody lists
        {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []},  # a diamond is no cycle
        {"a": ["b"], "b": [], "c": ["a", "b"]},
    ],
)
def test_acyclic_graphs_have_no_cycle(graph: dict[str, list[str]]) -> None:
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    "graph",
    [
        {"a": ["a"]},  # itself
        {"a": ["b"], "b": ["a"]},
        {"a": ["b"], "b": ["c"], "c": ["a"]},
        {"x": ["a"], "a": ["b", "d"], "b": ["c"], "c": ["a"], "d": []},  # reached from outside
        {"a": ["d"], "d": [], "b": ["c"], "c": ["b"]},  # not from the first root
    ],
)
def test_each_cycle_is_found_as_the_path_that_closes_it(graph: dict[str, list[str]]) -> None:
    assert closes(find_cycle(graph), graph)


def test_a_long_chain_does_not_exhaust_the_stack() -> None:
    n = 50_000
    chain = {str(i): [str(i + 1)] for i in range(n)}
    assert find_cycle(chain) is None
    chain[str(n)] = ["0"]
    cycle = find_cycle(chain)
    assert cycle is not None and len(cycle) == n + 2 and closes(cycle, chain)
