"""The asking side of the query subjects, as the gateway speaks it: for tools, tests and bench."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.client import Client

from taskbus.contracts import subjects
from taskbus.contracts.queries import Query, QueryError, Reply

R = TypeVar("R", bound=Reply)


class QueryClient:
    """Core NATS request-reply on `taskbus.query.<name>`; the reply is `reply_type` or an error."""

    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout

    async def ask(self, query: Query, reply_type: type[R]) -> R | QueryError:
        return await self.ask_raw(query.subject_name, msgspec.json.encode(query), reply_type)

    async def ask_raw(self, name: str, body: bytes, reply_type: type[R]) -> R | QueryError:
        """Send a body as it is, e.g. one that is not a valid query."""
        msg = await self._nc.request(subjects.query_subject(name), body, timeout=self._timeout)
        reply: R | QueryError = msgspec.json.decode(msg.data, type=reply_type | QueryError)
        return reply
