"""The ingest's status projection of the conversations it folds, bounded: the least recently
ingested are dropped past `capacity`, and a miss is looked up in ClickHouse's `conversations`.

That lookup is exact because the ingest writes a conversation's row before it acks the events
folded into it (ingest), so what ClickHouse holds is what the fold last reached; it is what a
new partition holder starts from anyway. A new conversation is a miss too (one query for a
batch's misses): whether it was stored cannot be told from its delivery count, as a fresh
consumer replays a log that was stored long ago.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping

from taskbus.contracts.queries import ConversationInfo
from taskbus.event_store import sql
from taskbus.event_store.clickhouse import ClickHouse


class ConversationCache(Mapping[str, ConversationInfo]):
    """An LRU map conversation id -> its projection. Reading through the mapping (the read
    barrier's check) neither orders nor looks up: a miss there means "not known here yet"."""

    def __init__(self, clickhouse: ClickHouse, capacity: int) -> None:
        self._clickhouse = clickhouse
        self._capacity = capacity
        self._entries: OrderedDict[str, ConversationInfo] = OrderedDict()

    def __getitem__(self, conversation_id: str) -> ConversationInfo:
        return self._entries[conversation_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, conversation_ids: Iterable[str]) -> dict[str, ConversationInfo]:
        """The projections of `conversation_ids` held or stored (one query for those not
        held), for one batch's fold: returned, not held, so none is dropped before the fold."""
        wanted = set(conversation_ids)
        found = {cid: self._entries[cid] for cid in wanted if cid in self._entries}
        missing = sorted(wanted - found.keys())
        if missing:
            stored = await self._clickhouse.conversations(sql.conversations_by_id(missing))
            found.update((info.conversation_id, info) for info in stored)
        return found

    def update(self, infos: Iterable[ConversationInfo]) -> None:
        """Hold `infos` as the most recently used, dropping the least recently used past the
        capacity (their rows are stored: the ingest updates the cache after writing)."""
        for info in infos:
            self._entries[info.conversation_id] = info
            self._entries.move_to_end(info.conversation_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, conversation_ids: Iterable[str]) -> None:
        for cid in list(conversation_ids):
            self._entries.pop(cid, None)
