"""Idle memory of the whole embedded stack (issue 13, item 3), per process, beside the target.

    uv run python bench/idle_memory.py [--settle 10] [--tasks 0]

Starts `taskbus up` in a temp data dir (gateway, session-manager, runtime-runner, event-store,
nats-server, the scripted model, and the launcher itself), runs `--tasks` demo tasks to the end
so every lazy import and cache has been touched, lets it settle for `--settle` seconds, then
prints each process's RSS and PSS (its share of pages shared with others, so the PSS column adds
up to what the machine gives the stack). Target: the RSS total <= 800 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stack the tests start
from taskbus.devtools.local_stack import read_state
from tests.conftest import Stack, running_stack

TARGET_MB = 800.0


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "Rss":
            rss = int(value.split()[0]) / 1024
        elif name == "Pss":
            pss = int(value.split()[0]) / 1024
    return rss, pss


def label(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in args if a]
    if "-m" in words:
        return words[words.index("-m") + 1]
    return Path(words[0]).name if words else str(pid)


async def finish_tasks(stack: Stack, tasks: int) -> None:
    async with stack.client() as api:
        cids = []
        for n in range(tasks):
            answer = await api.post("/api/conversations", json={"initial_user_msg": f"task {n}"})
            cids.append(answer.json()["conversation_id"])
        for cid in cids:
            for _ in range(600):
                status = (await api.get(f"/api/conversations/{cid}")).json()["taskbus_status"]
                if status in ("FINISHED", "ERROR", "STOPPED"):
                    break
                await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--tasks", type=int, default=0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp)) as stack:
        await finish_tasks(stack, options.tasks)
        await asyncio.sleep(options.settle)
        state = read_state(stack.data_dir)
        assert state is not None, "taskbus up wrote no state"
        rows = [(label(pid), pid, *memory_mb(pid)) for pid in descendants(state.pid)]
    print(f"\nIdle memory of `taskbus up` after {options.tasks} tasks and {options.settle:g} s")
    print(f"{'process':36}{'pid':>8}{'RSS MB':>9}{'PSS MB':>9}")
    for name, pid, rss, pss in sorted(rows, key=lambda row: -row[2]):
        print(f"{name:36}{pid:>8}{rss:>9.0f}{pss:>9.0f}")
    total_rss, total_pss = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"{'total':44}{total_rss:>9.0f}{total_pss:>9.0f}   target RSS <= {TARGET_MB:.0f}")


if __name__ == "__main__":
    asyncio.run(main())
