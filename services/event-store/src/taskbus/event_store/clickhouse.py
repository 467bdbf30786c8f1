"""ClickHouse adapter: clickhouse-connect's sync clients driven from asyncio by worker threads.

The chDB backend has no async client, and the sync API speaks HTTP to a ClickHouse server just the
same, so `chdb:<path>` and `http://host:8123` are one DSN apart with the same SQL. chDB runs in
this process and a data path may be opened by one process only: the event-store owns its path.
Ingest writes on its own connection; queries share a small pool, so a slow search never waits
behind an insert and vice versa.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext

from taskbus.contracts.queries import ConversationInfo
from taskbus.event_store import sql
from taskbus.event_store.rows import (
    CONVERSATION_COLUMNS,
    EVENT_COLUMNS,
    EventRow,
    conversation_from_row,
    conversation_row,
)

log = logging.getLogger(__name__)


class ClickHouse:
    def __init__(self, writer: Client, readers: Sequence[Client]) -> None:
        self._writer = writer
        self._readers: asyncio.Queue[Client] = asyncio.Queue()
        for reader in readers:
            self._readers.put_nowait(reader)
        self._clients = [writer, *readers]
        self._insert_contexts: dict[str, InsertContext] = {}  # the writer's, by table (`_insert`)

    @classmethod
    async def connect(cls, dsn: str, query_connections: int) -> ClickHouse:
        def open_clients() -> list[Client]:
            return [_open(dsn) for _ in range(1 + query_connections)]

        writer, *readers = await asyncio.to_thread(open_clients)
        return cls(writer, readers)

    async def close(self) -> None:
        def close_all() -> None:
            for client in self._clients:
                client.close()

        await asyncio.to_thread(close_all)

    async def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded in `schema_migrations`; return their versions."""

        def run() -> list[int]:
            self._insert_contexts.clear()
            self._writer.command(sql.SCHEMA_MIGRATIONS_TABLE)
            applied = {row[0] for row in self._writer.query(sql.APPLIED_MIGRATIONS).result_rows}
            pending = sql.pending_migrations(applied)
            for migration in pending:
                for statement in migration.statements:
                    self._writer.command(statement)
                self._writer.insert(
                    "schema_migrations",
                    [[migration.version, migration.description, datetime.now(UTC)]],
                    column_names=["version", "description", "applied_at"],
                )
                log.info("applied migration %d: %s", migration.version, migration.description)
            return [migration.version for migration in pending]

        return await asyncio.to_thread(run)

    async def drop_all_tables(self) -> None:
        def run() -> None:
            self._insert_contexts.clear()
            for statement in sql.DROP_TABLES:
                self._writer.command(statement)

        await asyncio.to_thread(run)

    async def insert_events(self, rows: Sequence[EventRow]) -> None:
        if rows:
            await asyncio.to_thread(self._insert, "events", EVENT_COLUMNS, list(rows))

    async def upsert_conversations(self, conversations: Sequence[ConversationInfo]) -> None:
        if conversations:
            rows = [conversation_row(info) for info in conversations]
            await asyncio.to_thread(self._insert, "conversations", CONVERSATION_COLUMNS, rows)

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert on the writer with the table's insert context, made once: without one,
        clickhouse-connect asks for the table's column types (DESCRIBE) before every insert.
        The migrations and `drop_all_tables` forget the contexts (the columns may change)."""
        context = self._insert_contexts.get(table)
        if context is None:
            context = self._writer.create_insert_context(table, list(columns))
            self._insert_contexts[table] = context
        context.data = rows
        self._writer.insert(context=context)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        def run() -> None:
            for statement in sql.delete_conversation(user_id, conversation_id):
                self._writer.command(statement.sql, parameters=statement.parameters)

        await asyncio.to_thread(run)

    async def conversations(self, statement: sql.Statement) -> list[ConversationInfo]:
        return [conversation_from_row(row) for row in await self.select(statement)]

    async def select(self, statement: sql.Statement) -> Sequence[Sequence[Any]]:
        """Rows of `statement`; String columns come back as bytes only for `payload`."""
        async with self._reader() as client:
            result = await asyncio.to_thread(
                client.query,
                statement.sql,
                parameters=statement.parameters,
                column_formats={"payload": "bytes"},
            )
        rows: Sequence[Sequence[Any]] = result.result_rows
        return rows

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[Client]:
        client = await self._readers.get()
        try:
            yield client
        finally:
            self._readers.put_nowait(client)


def chdb_lock_holder(dsn: str) -> str | None:
    """Who holds an embedded chDB data path open ("PID: 123", from ClickHouse's `status` file,
    which the owner keeps flock-ed); None when the path is free, or `dsn` is a server's.
    Asked before opening the path, where chDB would fail with an opaque error."""
    parsed = urlsplit(dsn)
    if parsed.scheme != "chdb" or parsed.netloc:
        return None
    status = Path(parsed.path) / "status"
    try:
        with status.open("rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return file.readline().decode(errors="replace").strip() or "another process"
            fcntl.flock(file, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return None


# madvise(2)'s MADV_PAGEOUT (Linux 5.4+): reclaim these pages now, as memory pressure would.
_MADV_PAGEOUT = 21
_CHDB_LIBRARY = "/chdb/_chdb"


def release_start_up_pages() -> int:
    """Have the kernel reclaim the resident pages of chDB's library; the bytes advised.

    Opening chDB reads about 250 MB of its 550 MB library (clean pages of the file, counted
    in the process' RSS until memory pressure reclaims them), and little of it is used again:
    ingest and queries fault back 60-100 MB. Called once the store is migrated, this takes
    the event-store's idle RSS down by about 100 MB. Only pages no other process maps are
    reclaimed; a kernel without MADV_PAGEOUT leaves everything resident (0)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or _CHDB_LIBRARY not in fields[5] or "w" in fields[1]:
                continue  # writable: relocated data, not the file's clean pages
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if madvise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


def _open(dsn: str) -> Client:
    # tz_mode="aware": DateTime64('UTC') columns come back as aware UTC datetimes.
    return clickhouse_connect.get_client(dsn=dsn, tz_mode="aware")
