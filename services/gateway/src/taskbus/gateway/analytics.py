"""`GET /api/analytics/*`: the caller's own usage reports, answered by event-store."""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Query, Response

from taskbus.contracts.queries import (
    CostAnalytics,
    CostGroupBy,
    CostReport,
    DurationAnalytics,
    DurationReport,
    EventKindCounts,
    EventKindReport,
    FailingCommands,
    FailingCommandsReport,
    Reply,
    ResourceAnalytics,
    ResourceReport,
)
from taskbus.gateway.dependencies import BusDep, UserId
from taskbus.gateway.rest import Limit, Since, Until, contract_query, json_response

router = APIRouter(prefix="/api/analytics", tags=["analytics"])


def report_response(report: Reply) -> Response:
    """The report's fields without the reply's `type` tag (a detail of the query protocol)."""
    return json_response(msgspec.structs.asdict(report))


@router.get("/cost", summary="Your LLM spend, per user, day, model or conversation")
async def cost(
    user: UserId,
    bus: BusDep,
    group_by: CostGroupBy = CostGroupBy.DAY,
    since: Since = None,
    until: Until = None,
) -> Response:
    """Summed over the LLMMetrics events of your conversations, one bucket per key."""
    query = contract_query(CostAnalytics, user_id=user, group_by=group_by, since=since, until=until)
    return report_response(await bus.ask(query, CostReport))


@router.get("/durations", summary="How your conversations ended and how long they took")
async def durations(
    user: UserId, bus: BusDep, since: Since = None, until: Until = None
) -> Response:
    """The window applies to the conversations' creation time."""
    query = contract_query(DurationAnalytics, user_id=user, since=since, until=until)
    return report_response(await bus.ask(query, DurationReport))


@router.get("/event-kinds", summary="Events per kind, over all or one of your conversations")
async def event_kinds(
    user: UserId,
    bus: BusDep,
    conversation_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Since = None,
    until: Until = None,
) -> Response:
    """Another user's or an unknown conversation gives an empty report, as every query is
    scoped to the caller."""
    query = contract_query(
        EventKindCounts, user_id=user, conversation_id=conversation_id, since=since, until=until
    )
    return report_response(await bus.ask(query, EventKindReport))


@router.get("/failing-commands", summary="Your commands that most often exit non-zero")
async def failing_commands(
    user: UserId,
    bus: BusDep,
    limit: Limit = 10,
    since: Since = None,
    until: Until = None,
) -> Response:
    """A soft timeout (the command still runs) is not a failure."""
    query = contract_query(FailingCommands, user_id=user, limit=limit, since=since, until=until)
    return report_response(await bus.ask(query, FailingCommandsReport))


@router.get("/resources", summary="What your conversations' sandboxes used of the host")
async def resources(
    user: UserId,
    bus: BusDep,
    limit: Limit = 20,
    since: Since = None,
    until: Until = None,
) -> Response:
    """From the ResourceUsage events in the window (sampled every few seconds while a sandbox
    runs), one row per conversation, highest peak memory first."""
    query = contract_query(ResourceAnalytics, user_id=user, limit=limit, since=since, until=until)
    return report_response(await bus.ask(query, ResourceReport))
